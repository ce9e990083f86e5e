"""The memorization verdict: a threshold calibrated on held-out images, and binomial intervals on every fraction.

The held-out reference images play the part of new images from the training distribution. The threshold
on a score s (lower: closer to the training set) is a conformal quantile of the reference scores (Vovk et
al. 2005; Angelopoulos & Bates 2021): with n reference scores, flag s < s_(m), the m-th smallest, for
m = floor((n + 1) rate). If a new image and the n references are exchangeable, its rank among the n + 1 is
uniform, so P(flagged) <= m / (n + 1) <= rate. With fewer than 1 / rate - 1 references (n < 99 at 1 %)
m would be 0 (flag nothing); the rule then takes m = 1 (the smallest reference score) and the bound is
1 / (n + 1), larger than the rate: the summary reports that bound.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson(count: int, total: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval (Wilson 1927) of a binomial fraction count / total; (None, None) for total 0."""
    if total <= 0:
        return None, None
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def fraction(mask: np.ndarray) -> dict:
    """Count, total and fraction of a boolean mask, with its 95 % Wilson interval."""
    count, total = int(np.sum(mask)), int(np.size(mask))
    low, high = wilson(count, total)
    return {"count": count, "total": total, "fraction": count / total if total else None,
            "ci_low": low, "ci_high": high}


def conformal_rank(n: int, rate: float) -> int:
    """m of the rule above: floor((n + 1) rate), at least 1 (at most n)."""
    return int(min(n, max(1, math.floor((n + 1) * rate + 1e-9))))


def calibrate(reference: np.ndarray, rate: float) -> dict:
    """The threshold on reference scores (lower: closer) that flags new images at most ``rate`` of the time,
    its rank m, and the bound m / (n + 1) on the false flag rate it guarantees."""
    n = len(reference)
    m = conformal_rank(n, rate)
    return {"threshold": float(np.sort(reference)[m - 1]), "rank": m, "references": n,
            "guaranteed_rate": m / (n + 1)}


def leave_one_out_flags(reference: np.ndarray, rate: float) -> np.ndarray:
    """Reference image i flagged by the threshold calibrated on the other n - 1: an honest false flag rate
    (in-sample, at most (m - 1) / n of the references are below their own threshold by construction)."""
    n = len(reference)
    if n < 2:
        return np.zeros(n, bool)
    m = conformal_rank(n - 1, rate)
    order = np.sort(reference)
    rank = np.argsort(np.argsort(reference, kind="stable"), kind="stable")  # 0-based rank of each
    # the m-th smallest of the others: order[m - 1] if i is not among the m smallest, else order[m]
    threshold = np.where(rank >= m, order[m - 1], order[min(m, n - 1)])
    return reference < threshold


def leave_one_out_above(reference: np.ndarray) -> np.ndarray:
    """Reference image i more similar to the training set than every other reference (the above_reference
    test applied to a reference image, calibrated without it)."""
    if len(reference) < 2:
        return np.zeros(len(reference), bool)
    order = np.sort(reference)
    others_max = np.where(reference >= order[-1], order[-2], order[-1])
    return reference > others_max


SCORE = ("shift-tolerant tiled-L2 ratio: the smallest tiled-L2 distance between the sample, moved by up to "
         "'shift' feature pixels, and any of its 50 tiled-L2 nearest training images, / the mean unshifted "
         "tiled-L2 distance to its n nearest; lower is closer")


def verdict(tests: dict, ref_tests: dict | None, criterion: str,
            rate: float) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """The headline verdict and every component test with its reference false flag rate, from the per-image
    numbers of :func:`ldmflow.evaluation.search.neighbour_tests` (plus ``shift_ratio``) of the generated
    samples and of the reference. Returns (the summary's ``memorized``, ``tests`` and ``reference``
    entries; the headline flags per sample; the calibrated flags per sample or None)."""
    has_ref = ref_tests is not None and len(ref_tests["similarity"]) > 0
    gen_flags = {"tiled_l2": tests["memorized_tiled_l2"], "nn_ratio": tests["memorized_nn_ratio"]}
    ref_flags = {"tiled_l2": ref_tests["memorized_tiled_l2"], "nn_ratio": ref_tests["memorized_nn_ratio"]} \
        if has_ref else {}
    components: dict = {}
    calibration = None
    if has_ref:
        sim_max = float(ref_tests["similarity"].max())
        gen_flags["above_reference"] = tests["similarity"] > sim_max
        ref_flags["above_reference"] = leave_one_out_above(ref_tests["similarity"])
        calibration = calibrate(ref_tests["shift_ratio"], rate)
        gen_flags["calibrated"] = tests["shift_ratio"] < calibration["threshold"]
        ref_flags["calibrated"] = leave_one_out_flags(ref_tests["shift_ratio"], rate)
    for name in ("either", "both"):
        t, r = gen_flags["tiled_l2"], gen_flags["nn_ratio"]
        gen_flags[name] = (t | r) if name == "either" else (t & r)
        if has_ref:
            rt, rr = ref_flags["tiled_l2"], ref_flags["nn_ratio"]
            ref_flags[name] = (rt | rr) if name == "either" else (rt & rr)
    for name, flags in gen_flags.items():
        components[name] = {**fraction(flags),
                            "reference_false_flags": fraction(ref_flags[name]) if has_ref else None}
    if has_ref:
        components["above_reference"]["reference_false_flags"]["estimate"] = (
            "leave-one-out: each reference image against the largest similarity of the others")
        components["calibrated"].update(
            {**calibration, "rate": rate, "score": SCORE,
             "rule": "flagged when the score is below the m-th smallest reference score, m = "
                     "max(1, floor((n + 1) rate)); false flag rate of new images <= m / (n + 1)"})
        components["calibrated"]["reference_false_flags"]["estimate"] = (
            "leave-one-out: each reference image against the threshold calibrated on the others")
    used = criterion if (criterion != "calibrated" or has_ref) else "tiled_l2"
    headline = {**components[used], "criterion": used, "requested": criterion, "calibrated": used == "calibrated"}
    headline["reference_false_flag_rate"] = headline.pop("reference_false_flags")
    if used == "calibrated":
        headline["threshold"] = calibration["threshold"]
        if calibration["guaranteed_rate"] > rate * (1 + 1e-9):
            headline["warning"] = (f"only {calibration['references']} held-out images: the threshold (their "
                                   f"smallest score) bounds the false flag rate of new images by "
                                   f"{calibration['guaranteed_rate']:.1%}, not the {rate:.1%} asked; give at least "
                                   f"{math.ceil(1 / rate) - 1} held-out images")
    elif not has_ref:
        headline["uncalibrated"] = ("no held-out reference images: the headline uses the fixed tiled_l2 threshold, "
                                    "whose false flag rate on new images is unknown")
    else:
        headline["uncalibrated"] = (f"criterion {used} has a fixed threshold; its false flag rate on the reference "
                                    "is reported, not bounded")
    reference = None
    if has_ref:
        reference = {f"memorized_{k}": v["reference_false_flags"] for k, v in components.items()}
        reference["memorized"] = components[used]["reference_false_flags"]
        reference["max_similarity"] = float(ref_tests["similarity"].max())
    return {"memorized": headline, "tests": components, "reference": reference}, gen_flags[used], \
        gen_flags.get("calibrated")
