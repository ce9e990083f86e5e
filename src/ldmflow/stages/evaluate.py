"""Evaluation in pixel space by the judge (:mod:`ldmflow.evaluation.judge`): train it on real images, then score
generated samples with it, each score next to the judge's own real-val accuracy and mIoU. The judge is an
ensemble (``judge.members``): a score's sample interval is its first member's; ``judges`` beside it gives the
median and range (min..max) across members, and a target counts as met only at the range's low end.

- :func:`train_judge_stage`: ``judge.pt``, ``judge.json`` (real-val figures, training curve) and ``judge_val.png``.
- :func:`evaluate_samples`: class fidelity, a two-sample test and Fréchet distance / precision / recall of a samples
  folder or ``samples.zarr`` (``scores.json``, ``grid.png``).
- :func:`evaluate_controlnet`: a ControlNet and its uncontrolled base sampled under the same noise on val-split
  masks; the judge segments each decoded image, scored against the control mask (``scores.json``, ``grid.png``).
- :func:`evaluation_summary`: one CSV row per experiment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldmflow.artifacts import atomic_write_bytes, atomic_write_json, file_sha256
from ldmflow.checkpoints import load_controlnet, load_diffusion, load_judge, verified_autoencoder
from ldmflow.config.judge import JudgeConfig, judge_config
from ldmflow.config.schema import to_dict
from ldmflow.data.draws import stratified_rows
from ldmflow.data.images import to_unit_range
from ldmflow.devices import get_device
from ldmflow.errors import DataError
from ldmflow.evaluation.judge import (
    DecodedLatents,
    ImageFiles,
    Images,
    Judge,
    Rows,
    ensemble_outputs,
    ensemble_score,
    judge_outputs,
    members,
    real_images,
    save_judge,
    segmentation_of,
    train_judge,
    validity,
)
from ldmflow.evaluation.two_sample import feature_scores, two_sample_test, wilson_interval
from ldmflow.metadata import JudgeMeta, SamplesAttrs
from ldmflow.viz import colorize, grid, save_png, to_uint8

log = logging.getLogger(__name__)

GRID_ROWS = 16  # samples drawn in an evaluation grid
MAX_REAL = 5000  # real images of each split read for the scores (a seeded draw; FD and the two-sample test
# need no more)


# --------------------------------------------------------------------------------------------------
# Training the judge
# --------------------------------------------------------------------------------------------------


def train_judge_stage(latents: str | Path, out_dir: str | Path, options: JudgeConfig | dict | None = None, *,
                      device: str | None = None, threads: int = 4) -> dict:
    """Train the judge on the real train split of a latent store (or manifest) and write ``OUT/judge.pt``,
    ``OUT/judge.json`` (real-val accuracy, mIoU, per-class figures, training curve) and ``OUT/judge_val.png``
    (val image | true mask | judge's segmentation, with a green or red frame: class read right or wrong)."""
    cfg = judge_config(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, record = train_judge(latents, cfg, device=get_device(device), threads=threads)
    save_judge(model, record, out / "judge.pt")
    record = {"judge": str(out / "judge.pt"), "latents": JudgeMeta.of_judge(model)[0].latents, "config": to_dict(cfg),
              **record}
    atomic_write_json(out / "judge.json", record)
    real = real_images(latents, threads, JudgeMeta.of_judge(model)[0].image_size)
    held = real.indices(record["held_out_split"])
    held = held[stratified_rows(None if real.labels is None else real.labels[held].numpy(), min(GRID_ROWS, len(held)),
                                0, length=len(held))]
    _write_grid(out / "judge_val.png", model, real.images[held], None if real.labels is None else real.labels[held],
                None if real.masks is None else real.masks[held])
    v = record["real_val"]
    log.info("judge: real-val accuracy %s, mIoU %s (%d %s images; %d members, accuracy %s, mIoU %s) in %.1f s",
             _fmt(v.get("accuracy")), _fmt(v.get("miou")), v["n"], record["held_out_split"], len(record["members"]),
             _range(record["ensemble"]["accuracy"]), _range(record["ensemble"]["miou"]), record["seconds"])
    return record


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _range(scores: dict | None) -> str | None:
    """An ensemble's score as 'median (min..max)'."""
    return None if scores is None else f"{scores['median']:.3f} ({scores['min']:.3f}..{scores['max']:.3f})"


def judge_validity(model: Judge) -> dict:
    """What the judge reaches on real held-out images: reported next to every score it gives."""
    v = model.validity["real_val"]
    return {"real_val_accuracy": v.get("accuracy"), "real_val_accuracy_ci95": v.get("accuracy_ci95"),
            "real_val_balanced_accuracy": v.get("balanced_accuracy"), "real_val_miou": v.get("miou"),
            "real_val_images": v["n"], "held_out_split": model.validity["held_out_split"],
            "members": {key: ensemble_score(model, lambda m, key=key: m.validity["real_val"].get(key))
                        for key in ("accuracy", "miou")}}


def _frame(tiles: np.ndarray, ok: torch.Tensor | None) -> np.ndarray:
    """A 1-pixel green (judge agrees) or red (it does not) frame around each tile (N, H, W, 3)."""
    if ok is None:
        return tiles
    tiles = tiles.copy()
    colour = np.where(ok.numpy()[:, None], [[40, 200, 40]], [[220, 30, 30]]).astype(np.uint8)  # (N, 3)
    for edge in (np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1]):
        view = tiles[edge]
        tiles[edge] = colour.reshape(-1, *([1] * (view.ndim - 2)), 3)
    return tiles


def _write_grid(path: Path, model: Judge, images: torch.Tensor, labels: torch.Tensor | None,
                masks: torch.Tensor | None, extra: list[tuple[torch.Tensor, torch.Tensor | None]] = ()) -> None:
    """Rows of: image (framed by whether the judge reads its label) | [mask] | judge's segmentation, then
    the same for each further image set of ``extra`` (images, masks shown only once)."""
    columns = []
    for imgs in [images, *[e[0] for e in extra]]:
        out = judge_outputs(model, imgs)
        ok = None
        if out["probs"] is not None and labels is not None:
            ok = out["probs"].argmax(1) == labels
        columns.append(_frame(to_uint8(imgs), ok))
        if imgs is images and masks is not None:
            columns.append(colorize(masks))
        if out["seg"] is not None:
            columns.append(colorize(out["seg"]))
    save_png(grid(columns), path, upscale=max(1, 64 // images.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def class_fidelity(model: Judge, probs: torch.Tensor | None, labels: torch.Tensor | None,
                   unlabelled: str = "the model is unconditional (no generated labels)") -> dict:
    """The judge's accuracy against the label each sample was generated for (Classification Accuracy Score idea,
    Ravuri & Vinyals 2019), with a 95% Wilson interval, per class and the confusion counts."""
    if probs is None:
        return {"available": False, "reason": "not available: no labels (the judge has no class head)"}
    if labels is None or not (labels >= 0).any():
        return {"available": False, "reason": f"not available: {unlabelled}"}
    known = labels >= 0
    pred, truth = probs.argmax(1)[known], labels[known]
    k = probs.shape[1]
    classes = JudgeMeta.of_judge(model)[0].classes or [str(i) for i in range(k)]
    conf = torch.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    correct = int(conf.diag().sum())
    return {"available": True, "accuracy": correct / len(truth), "accuracy_ci95": wilson_interval(correct, len(truth)),
            "n": len(truth), "chance": float((torch.bincount(truth, minlength=k).float() / len(truth)).pow(2).sum()),
            "per_class_accuracy": {c: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None)
                                   for i, c in enumerate(classes)},
            "confusion": {"rows": "generated label", "columns": "judge's class", "classes": classes,
                          "counts": conf.tolist()}}


def decoder_reference(model: Judge, real, held: np.ndarray, held_f: np.ndarray, decoder, folds: int) -> dict:
    """The judge on the autoencoder's reconstructions of the real held-out images (their stored latents decoded):
    the most a model whose samples this autoencoder decodes can reach, and how far the decoder alone sets
    its images apart from real ones."""
    from ldmflow.data.latent_store import LatentStore

    store = LatentStore(JudgeMeta.of_judge(model)[0].latents)
    device = next(decoder.parameters()).device
    rows = held if real.rows is None else real.rows[held]  # store rows of the held-out images
    z = torch.from_numpy(np.asarray(store.latents.get_orthogonal_selection((rows,)), np.float32))
    with torch.no_grad():
        rec = torch.cat([decoder.decode(z[i:i + 64].to(device))[0].float().clamp(-1, 1).cpu()
                         for i in range(0, len(z), 64)])
    v = validity(model, rec, None if real.labels is None else real.labels[held],
                 None if real.masks is None else real.masks[held], real.mask_classes, real.classes)
    ts = two_sample_test(held_f, judge_outputs(model, rec)["features"].numpy(), folds=folds)
    return {"what": "the judge on the autoencoder's reconstructions of the real held-out images: a ceiling for "
                    "models decoded by it", "n": len(held), "accuracy": v.get("accuracy"), "miou": v.get("miou"),
            "two_sample_accuracy": ts.get("accuracy"), "two_sample_ci95": ts.get("accuracy_ci95")}


def sample_scores(model: Judge, images: Images, labels: torch.Tensor | None, *, folds: int = 5, pr_k: int = 3,
                  threads: int = 4, unlabelled: str = "the model is unconditional (no generated labels)",
                  decoder=None) -> dict:
    """Class fidelity, the two-sample test (real held-out vs generated) and feature-space FD / precision / recall
    of generated images (N, C, H, W) in [-1, 1], with the judge's validity figures; with the ``decoder`` that
    made the judge's latent store, the same judge on its reconstructions of real held-out images."""
    real = real_images(JudgeMeta.of_judge(model)[0].latents, threads, JudgeMeta.of_judge(model)[0].image_size,
                       max_per_split=MAX_REAL)
    held = real.indices("val", "test")
    # every judge reads the samples in one pass (decoded once) when the class fidelity needs them all
    judges = members(model) if model.classifier is not None and labels is not None and (labels >= 0).any() else []
    outs = ensemble_outputs([model, *[m for m in judges if m is not model]], images)
    gen = outs[0]
    train_f = judge_outputs(model, Rows(real.images, real.indices("train")))["features"].numpy()
    held_f = judge_outputs(model, Rows(real.images, held))["features"].numpy()
    gen_f = gen["features"].numpy()
    reference = (decoder_reference(model, real, held, held_f, decoder, folds) if decoder is not None else
                 {"available": False, "reason": "the samples' autoencoder is unknown or not the store's"})
    fidelity = class_fidelity(model, gen["probs"], labels, unlabelled)
    if fidelity["available"]:  # the sample interval is the first judge's; the range is the judges'
        probs = iter(out["probs"] for out in outs[1:])
        fidelity["judges"] = ensemble_score(model, lambda m: class_fidelity(
            m, gen["probs"] if m is model else next(probs), labels)["accuracy"])
    return {"judge": judge_validity(model), "n_generated": len(images), "decoder_reference": reference,
            "class_fidelity": fidelity,
            "two_sample": {**two_sample_test(held_f, gen_f, folds=folds), "real": "val and test splits"},
            "features": {**feature_scores(train_f, held_f, gen_f, pr_k),
                         "space": "the judge's pooled encoder features",
                         "against": "the real train split; held_out: real val and test images (the reference)"}}


def load_samples(samples: str | Path, model: Judge, device) -> tuple[Images, torch.Tensor | None, str, object]:
    """A samples folder or ``samples.zarr`` as images (N, C, H, W) in [-1, 1] read a batch at a time (as they are
    scored), the labels they were generated for (None when unknown), a description, and the decoder when it is
    the judge's store's autoencoder: a store's latents decoded by the autoencoder that made them
    (sha256-checked); else the folder's ``sample_*.png`` (or image files), decoded as the judge's data."""
    import zarr

    path = Path(samples)
    store = path if (path / "zarr.json").is_file() else path / "samples.zarr"
    if (store / "zarr.json").is_file():
        group = zarr.open_group(str(store), mode="r")
        attrs = SamplesAttrs.from_dict(dict(group.attrs), str(store))
        decoder = verified_autoencoder(attrs, device).model
        images = DecodedLatents(group["latents"], decoder, 64)  # decoded a batch at a time as they are scored
        labels = torch.from_numpy(np.asarray(group["labels"][:], np.int64))
        same = _store_autoencoder_sha(model) == attrs.autoencoder_sha256
        return images, (labels if (labels >= 0).any() else None), str(store), decoder if same else None
    from ldmflow.data.manifest import IMAGE_SUFFIXES

    files = sorted(path.glob("sample_*.png")) or sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: neither a samples.zarr nor image files (sample_*.png) to evaluate")
    info = JudgeMeta.of_judge(model)[0]
    return (ImageFiles([str(f) for f in files], info.image_size, info.channels, info.value_range, str(path)), None,
            str(path), None)


def _store_autoencoder_sha(model: Judge) -> str | None:
    """The sha256 of the autoencoder that made the judge's latent store (None for a manifest-trained judge)."""
    if not (Path(JudgeMeta.of_judge(model)[0].latents) / "zarr.json").is_file():
        return None
    from ldmflow.data.latent_store import LatentStore

    return LatentStore(JudgeMeta.of_judge(model)[0].latents).info.autoencoder.sha256


def evaluate_samples(judge: str | Path, samples: str | Path, out_dir: str | Path | None = None, *,
                     options: JudgeConfig | dict | None = None, device: str | None = None, threads: int = 4) -> dict:
    """Score a samples folder or ``samples.zarr`` with the judge: class fidelity against the labels the samples
    were generated for, the two-sample test against real held-out images, FD and precision/recall in the judge's
    features; with ``out_dir``, write ``scores.json`` and ``grid.png`` (sample, framed green where the judge
    reads its generated label, red where not | the judge's segmentation)."""
    cfg = judge_config(options)
    dev = get_device(device)
    model = load_judge(judge, dev).model
    images, labels, source, decoder = load_samples(samples, model, dev)
    scores = {"samples": source, "judge_checkpoint": str(judge), "judge_sha256": file_sha256(judge),
              **sample_scores(model, images, labels, folds=cfg.folds, pr_k=cfg.pr_k, threads=threads, decoder=decoder,
                              unlabelled="the model is unconditional (no generated labels)" if source.endswith(".zarr")
                              else "image files without a samples.zarr carry no generated labels")}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "scores.json", scores)
        rows = slice(0, GRID_ROWS)
        _write_grid(out / "grid.png", model, images[rows], None if labels is None else labels[rows], None)
    _log_scores(source, scores)
    return scores


def _log_scores(source: str, scores: dict) -> None:
    cf, ts = scores["class_fidelity"], scores["two_sample"]
    log.info("%s: class fidelity %s (judges %s), two-sample accuracy %s, FD %s (judge real-val accuracy %s, mIoU %s)",
             source, _fmt(cf.get("accuracy")), _range(cf.get("judges")), _fmt(ts.get("accuracy")),
             _fmt((scores["features"].get("generated") or {}).get("fd")),
             _fmt(scores["judge"]["real_val_accuracy"]), _fmt(scores["judge"]["real_val_miou"]))


# --------------------------------------------------------------------------------------------------
# ControlNets
# --------------------------------------------------------------------------------------------------


def evaluate_controlnet(checkpoint: str | Path, judge: str | Path, out_dir: str | Path | None = None, *,
                        n: int = 48, seed: int = 42, options: JudgeConfig | dict | None = None,
                        device: str | None = None, batch_size: int = 64, threads: int = 4) -> dict:
    """Control fidelity in pixel space: N samples of a ControlNet under the val split's controls in turn, and N of
    its uncontrolled base diffusion model (its own checkpoint, sha256-checked) from the same noise and labels;
    the judge segments every decoded image, scored (mIoU) against the control's mask. Also the class fidelity,
    two-sample test and FD of the controlled samples. With ``out_dir``: ``scores.json`` and ``grid.png``
    (controlled | mask | its judge segmentation | base | its judge segmentation)."""
    cfg = judge_config(options)
    dev = get_device(device)
    model = load_judge(judge, dev).model
    loaded = load_controlnet(checkpoint, dev)
    ncfg, meta = loaded.config, loaded.meta
    sampling, scale = ncfg.sampling.base(), ncfg.sampling.scale
    drawn = ControlNetDraws.of(loaded, n, seed, dev, batch_size)
    base_path = Path(meta.base_checkpoint)
    scores = {"experiment": ncfg.name, "fusion": ncfg.model.fusion, "signal": ncfg.control.signal,
              "checkpoint": str(checkpoint), "base_checkpoint": str(base_path), "controls": drawn.described, "n": n,
              "seed": seed, "sampler": sampling.sampler, "steps": sampling.steps, "guidance": sampling.guidance,
              "scale": scale, "judge_checkpoint": str(judge), "judge_sha256": file_sha256(judge),
              **sample_scores(model, drawn.controlled, drawn.labels, folds=cfg.folds, pr_k=cfg.pr_k, threads=threads,
                              decoder=drawn.decoder if _store_autoencoder_sha(model) == meta.latents.autoencoder_sha256
                              else None)}
    scores["control_fidelity"] = control_fidelity(model, drawn.controlled, drawn.base, drawn.masks,
                                                  ncfg.control.signal, base_path)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "scores.json", scores)
        r = slice(0, GRID_ROWS)
        _write_grid(out / "grid.png", model, drawn.controlled[r], None if drawn.labels is None else drawn.labels[r],
                    None if drawn.masks is None else drawn.masks[r],
                    [] if drawn.base is None else [(drawn.base[r], None)])
    _log_scores(ncfg.name, scores)
    return scores


def drawn_rows(store, split: str, n: int, seed: int) -> np.ndarray:
    """N rows of one split of a latent store, drawn seeded and stratified by class (never its first N rows: a
    class-sorted manifest puts one or two classes there)."""
    rows = store.indices(split)
    if not len(rows):
        raise DataError(f"{store.path}: no {split} rows to draw from")
    return rows[stratified_rows(store.labels[rows], n, seed)]


@dataclass
class ControlNetDraws:
    """A ControlNet's samples under the val split's controls and its base model's from the same noise and labels:
    decoded images (N, C, H, W) in [-1, 1] as their PNGs hold them (``base`` None when its checkpoint is
    missing or changed), the labels, the rows' masks (N, H, W) and the decoder."""

    controlled: torch.Tensor
    base: torch.Tensor | None
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    described: str
    decoder: object

    @classmethod
    def of(cls, loaded, n: int, seed: int, dev, batch_size: int) -> ControlNetDraws:
        from ldmflow.control_inputs import load_control
        from ldmflow.data.latent_store import LatentStore
        from ldmflow.diffusion.generate import decode_latents, generate, seeded_noise
        from ldmflow.diffusion.schedules import NoiseSchedule

        ncfg, meta, base_cfg = loaded.config, loaded.meta, loaded.base_config
        store = LatentStore(meta.latents.latents)
        picks = drawn_rows(store, "val", n, seed)
        made = [load_control(str(i), ncfg, meta) for i in picks]
        controls, row_labels = torch.cat([c for c, _, _ in made]), [lab for _, lab, _ in made]
        described = f"{store.path} split val: {n} rows drawn seeded ({seed}) and stratified by class"
        masks = (torch.from_numpy(np.stack([store.masks[int(i)] for i in picks]).astype(np.int64))
                 if store.masks is not None else None)
        k = meta.num_classes
        labels = torch.tensor([lab if lab is not None else i % k for i, lab in enumerate(row_labels)]) if k else None
        decoder = verified_autoencoder(meta.latents, dev).model
        schedule = NoiseSchedule.from_config(base_cfg.diffusion).to(dev)

        def draw(model, with_controls: bool) -> torch.Tensor:
            noise, gen = seeded_noise(n, meta.latents.latent_shape, seed=seed, device=dev)
            z = generate(model, schedule, noise, labels=labels, controls=controls if with_controls else None,
                         control_scale=ncfg.sampling.scale, sampling=ncfg.sampling.base(),
                         prediction=base_cfg.diffusion.prediction, generator=gen, batch_size=batch_size)
            return to_unit_range(decode_latents(decoder, z, meta.latents.scale_factor, batch_size=batch_size)[1])

        base_path = Path(meta.base_checkpoint)
        base = None
        if base_path.is_file() and file_sha256(base_path) == meta.base_sha256:
            base = draw(load_diffusion(base_path, dev).model, False)
        return cls(draw(loaded.model, True), base, labels, masks, described, decoder)


def control_fidelity(model: Judge, controlled: torch.Tensor, base: torch.Tensor | None, masks: torch.Tensor | None,
                     signal: str, base_path: Path) -> dict:
    """mIoU of the judge's segmentation of each decoded image against its control mask: controlled and base."""
    if model.segmenter is None:
        return {"available": False, "reason": "not available: no masks (the judge has no segmentation head)"}
    if signal != "mask" or masks is None:
        return {"available": False, "reason": f"not available: the control signal is {signal}, not a mask"}
    k = JudgeMeta.of_judge(model)[0].mask_classes

    def miou(judge: Judge, images: torch.Tensor) -> float:
        return segmentation_of(judge, images, masks, k)["miou"]

    out = {"available": True, "measure": "mIoU of the judge's segmentation of the decoded image against the "
           "control mask (pixel space)", **judge_validity(model),
           "controlled": segmentation_of(model, controlled, masks, k),
           "judges": {"controlled": ensemble_score(model, lambda m: miou(m, controlled))}}
    if base is None:
        out["uncontrolled_base"] = {"available": False, "reason": f"base checkpoint {base_path} missing or changed"}
        return out
    out["uncontrolled_base"] = segmentation_of(model, base, masks, k)
    out["gain"] = out["controlled"]["miou"] - out["uncontrolled_base"]["miou"]
    out["judges"]["uncontrolled_base"] = ensemble_score(model, lambda m: miou(m, base))
    out["judges"]["gain"] = ensemble_score(model, lambda m: miou(m, controlled) - miou(m, base))
    return out


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["experiment", "judge_val_accuracy", "judge_val_miou", "class_fidelity", "class_fidelity_ci95",
                   "class_fidelity_chance", "class_fidelity_judges", "class_fidelity_judges_min",
                   "control_miou", "control_miou_judges", "control_miou_judges_min", "base_miou",
                   "two_sample_accuracy", "two_sample_ci95", "two_sample_n",
                   "fd", "fd_real_held_out", "precision", "recall", "n_generated", "decoder_ceiling_accuracy",
                   "decoder_ceiling_miou", "decoder_two_sample_accuracy"]


def scores_row(name: str, scores: dict) -> dict:
    """One experiment's pixel-space scores, flat, with the judge's real-val figures beside them."""
    cf, ts, feats = scores["class_fidelity"], scores["two_sample"], scores["features"]
    gen, held = feats.get("generated") or {}, feats.get("held_out") or {}
    ctl = scores.get("control_fidelity") or {}
    base = ctl.get("uncontrolled_base") or {}
    ref = scores.get("decoder_reference") or {}

    def ci(v):
        return None if v is None else f"{v[0]:.3f}-{v[1]:.3f}"

    return {"experiment": name, "judge_val_accuracy": scores["judge"]["real_val_accuracy"],
            "judge_val_miou": scores["judge"]["real_val_miou"],
            "class_fidelity": cf.get("accuracy", cf.get("reason")), "class_fidelity_ci95": ci(cf.get("accuracy_ci95")),
            "class_fidelity_chance": cf.get("chance"), "class_fidelity_judges": _range(cf.get("judges")),
            "class_fidelity_judges_min": (cf.get("judges") or {}).get("min"),
            "control_miou": (ctl.get("controlled") or {}).get("miou"),
            "control_miou_judges": _range((ctl.get("judges") or {}).get("controlled")),
            "control_miou_judges_min": ((ctl.get("judges") or {}).get("controlled") or {}).get("min"),
            "base_miou": base.get("miou"),
            "two_sample_accuracy": ts.get("accuracy"), "two_sample_ci95": ci(ts.get("accuracy_ci95")),
            "two_sample_n": ts.get("n_per_set"), "fd": gen.get("fd"), "fd_real_held_out": held.get("fd"),
            "precision": gen.get("precision"), "recall": gen.get("recall"), "n_generated": scores["n_generated"],
            "decoder_ceiling_accuracy": ref.get("accuracy"), "decoder_ceiling_miou": ref.get("miou"),
            "decoder_two_sample_accuracy": ref.get("two_sample_accuracy")}


def evaluation_summary(score_files: list[str | Path], names: list[str], out_csv: str | Path,
                       out_png: str | Path | None = None) -> list[dict]:
    """``summary.csv``: one row per experiment (``names``, e.g. 'diffusion/NAME') from its ``scores.json``; with
    ``out_png``, a plot of the scores with the judge's real-val accuracy and mIoU drawn as their ceilings."""
    rows = [scores_row(name, json.loads(Path(p).read_text())) for name, p in zip(names, score_files)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(out_csv, buf.getvalue().encode())
    if out_png is not None:
        _summary_plot(rows, Path(out_png))
    return rows


def _summary_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldmflow.artifacts import atomic_write_figure

    def num(v):
        return v if isinstance(v, (int, float)) and v is not None else np.nan

    bars = [("class_fidelity", "class fidelity", "tab:blue"), ("control_miou", "control mIoU", "tab:green"),
            ("base_miou", "base mIoU (no control)", "tab:olive"), ("two_sample_accuracy", "two-sample accuracy",
                                                                   "tab:red")]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.55 * max(len(rows), 1)))
    y = np.arange(len(rows))
    height = 0.8 / len(bars)
    for i, (key, label, colour) in enumerate(bars):
        ax.barh(y + (i - 1.5) * height, [num(r[key]) for r in rows], height, label=label, color=colour)
    if rows:
        acc, miou = num(rows[0]["judge_val_accuracy"]), num(rows[0]["judge_val_miou"])
        ax.axvline(acc, color="tab:blue", ls="--", lw=1, label=f"judge real-val accuracy {acc:.2f}")
        ax.axvline(miou, color="tab:green", ls="--", lw=1, label=f"judge real-val mIoU {miou:.2f}")
    ax.axvline(0.5, color="tab:red", ls=":", lw=1, label="two-sample chance (0.5)")
    ax.set_yticks(y, [r["experiment"] for r in rows])
    ax.set_xlim(0, 1.02)
    ax.invert_yaxis()
    ax.set_xlabel("score (judge in pixel space; dashed: what the judge reaches on real val images)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)
    plt.close(fig)
