import numpy as np
import pytest

from ldmflow.evaluation.verdict import (
    calibrate,
    conformal_rank,
    fraction,
    leave_one_out_above,
    leave_one_out_flags,
    wilson,
)


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 0/10 -> 0 to 0.2775; 15/148 -> 0.0624 to 0.1605
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson(0, 0) == (None, None)
    f = fraction(np.array([True] * 3 + [False] * 97))
    assert f["count"] == 3 and f["total"] == 100 and f["ci_low"] < f["fraction"] == 0.03 < f["ci_high"]


def test_conformal_rank_and_its_bound():
    assert conformal_rank(200, 0.01) == 2  # flag below the 2nd smallest of 200: at most 2 / 201
    assert conformal_rank(98, 0.01) == 1 and conformal_rank(60, 0.01) == 1  # too few: the minimum, bound 1 / 61
    assert conformal_rank(1000, 0.05) == 50
    cal = calibrate(np.arange(60.0)[::-1], 0.01)
    assert cal["threshold"] == 0.0 and cal["guaranteed_rate"] == pytest.approx(1 / 61)


def test_calibrated_threshold_flags_new_draws_at_most_the_rate_on_average():
    """Exchangeable scores: over many reference draws, a new draw is flagged at m / (n + 1) <= rate."""
    rng = np.random.default_rng(0)
    trials, n, rate = 20000, 200, 0.01
    ref = rng.normal(size=(trials, n))
    new = rng.normal(size=trials)
    thresholds = np.sort(ref, 1)[:, conformal_rank(n, rate) - 1]
    flagged = (new < thresholds).mean()
    lo, hi = wilson(int((new < thresholds).sum()), trials)
    print(f"new draws flagged: {flagged:.4f} (95% CI {lo:.4f}-{hi:.4f}); bound {2 / 201:.4f}")
    assert lo <= 2 / 201 and hi >= 0.005  # the bound holds and is not loose by more than half


def test_leave_one_out_flags_equal_recalibrating_without_each_image():
    rng = np.random.default_rng(1)
    for n, rate in ((50, 0.01), (200, 0.01), (300, 0.05)):
        scores = rng.normal(size=n)
        scores[3] = scores[5]  # a tie
        want = [scores[i] < calibrate(np.delete(scores, i), rate)["threshold"] for i in range(n)]
        assert leave_one_out_flags(scores, rate).tolist() == want
        want_above = [scores[i] > np.delete(scores, i).max() for i in range(n)]
        assert leave_one_out_above(scores).tolist() == want_above
