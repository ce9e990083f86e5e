"""Memorization evaluation: is a generated sample a copy of a training image?

Each generated sample is compared with every training image in one feature space (``pixel``: the image
at ``image_size`` pixels; ``latent``: the autoencoder's latent), with a blocked nearest-neighbour search
that never holds more than a memory budget's worth of the samples x training similarity matrix.

Every image becomes a feature vector that is **zero-mean and unit-norm** (so a global brightness or
contrast change of a copy does not hide it, and the dot product of two vectors is their cosine
similarity), stored cut into ``tiles`` x ``tiles`` spatial tiles. On these vectors:

* **similarity**: cosine similarity; the nearest training image is the most similar one.
* **tiled L2** (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"): the distance of
  two images is the *largest* L2 distance between corresponding tiles, so a copy must match everywhere,
  not only on average. A sample is memorized when its tiled-L2 distance to the nearest training image,
  divided by the mean tiled-L2 distance to its ``n`` (50) nearest training images, is below ``alpha``
  (0.5). Carlini et al. use raw pixels at 512 x 512 with 16 tiles; here the tiles are of the normalised
  vectors at ``image_size``.
* **nearest / second-nearest ratio**: d1 / d2 of the (global) L2 distances ``sqrt(2 - 2 cos)`` to the
  nearest and second-nearest training images; memorized when below ``ratio`` (1/3). Two identical
  training images make d2 = d1, so duplicates in the training set hide copies of them from this test.

**Reference**: held-out real images (the validation split, or ``reference``) are compared with the
training set in the same way. They were never trained on, so their similarities show how close an image
can be to the training set by chance: a generated sample closer than any held-out image is the
memorization signal (``above_reference``), and the reference's own flag rate estimates false positives.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow.artifacts import atomic_write_json
from ldmflow.config.memorization import MemorizationConfig, memorization_config
from ldmflow.config.schema import to_dict
from ldmflow.devices import get_device
from ldmflow.errors import DataError
from ldmflow.evaluation.image_sets import ImageSet, Loader, image_formats, open_image_set, tensor_image_set
from ldmflow.evaluation.memorization_report import _json_safe, _percentiles, write_histogram, write_per_sample
from ldmflow.evaluation.search import Neighbours, blocked_search, neighbour_tests, shift_ratio
from ldmflow.evaluation.verdict import verdict
from ldmflow.viz import grid, save_png, to_uint8

log = logging.getLogger(__name__)
SUMMARY_FORMAT = "ldmflow-memorization-v1"


def _quality(loader: Loader, train: ImageSet, samples: ImageSet, reference: ImageSet | None,
             cfg: MemorizationConfig) -> tuple[dict, dict]:
    """Fréchet distance and precision/recall in autoencoder features, and Inception FID when weights are given."""
    from ldmflow.evaluation import quality

    rng = np.random.default_rng(cfg.seed)

    def pick(s: ImageSet) -> np.ndarray:
        idx = np.arange(len(s))
        if len(s) <= cfg.quality_max_images:
            return idx
        return np.sort(rng.choice(idx, cfg.quality_max_images, replace=False))

    picks = {"train": pick(train), "generated": pick(samples)}
    sets = {"train": train, "generated": samples}
    if reference is not None and len(reference):
        picks["reference"], sets["reference"] = pick(reference), reference

    def numbers(feats: dict[str, np.ndarray]) -> dict:
        out: dict[str, Any] = {"images": {k: len(v) for k, v in feats.items()}}
        for name in ("generated", "reference"):
            if name not in feats:
                continue
            if min(len(feats["train"]), len(feats[name])) <= cfg.pr_k:
                out[name] = {"skipped": f"precision/recall and Fréchet distance need more than pr_k={cfg.pr_k} "
                                        "images in each set"}
                continue
            out[name] = {"frechet_distance": quality.frechet_distance(feats["train"], feats[name]),
                         **quality.precision_recall(feats["train"], feats[name], cfg.pr_k, device=loader.device)}
        return out

    if not cfg.quality:
        ae = {"skipped": "quality=false"}
    elif loader.checkpoint is None:
        ae = {"skipped": "no autoencoder checkpoint (give a latent store, or --set autoencoder=CHECKPOINT)"}
    else:
        model = loader.autoencoder.model
        feats = {}
        for name, s in sets.items():
            parts = [quality.autoencoder_features(model, loader.images(s, picks[name][b:b + 256], loader.ae_size),
                                                  cfg.batch_size) for b in range(0, len(picks[name]), 256)]
            feats[name] = np.concatenate(parts)
        ae = {"feature": f"autoencoder encoder features, average-pooled ({feats['train'].shape[1]} dims)",
              "checkpoint": loader.checkpoint, **numbers(feats)}

    if not cfg.inception:
        inception = {"skipped": "no Inception weights given: set inception=PATH to a local TorchScript Inception "
                                "(e.g. NVIDIA's inception-2015-12-05.pt) for Inception FID"}
    else:
        net = quality.load_inception(cfg.inception, loader.device)
        feats = {}
        for name, s in sets.items():
            parts = []
            for b in range(0, len(picks[name]), 256):
                x = loader.images(s, picks[name][b:b + 256], cfg.image_size)
                parts.append(quality.inception_features(net, torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2),
                                                        cfg.batch_size))
            feats[name] = np.concatenate(parts)
        inception = {"weights": str(cfg.inception), "image_size": cfg.image_size, **numbers(feats)}
    return ae, inception


def check_formats(sets: dict[str, ImageSet | None], loader: Loader, cfg: MemorizationConfig, notes: list[str]) -> None:
    """Refuse to compare images of different sizes or channel counts unless ``cfg.resize`` asks for it.

    Every image is resized to ``image_size`` for the features, so a 16 px sample against 32 px training
    images would be compared blurred against sharp and never flagged; with ``resize`` the mismatch is
    compared anyway and written into the summary's notes.
    """
    formats = {name: image_formats(s, lambda: loader.ae_size) for name, s in sets.items() if s is not None and len(s)}
    if any(c is None for f in formats.values() for (_, _, c) in f):  # channels unknown somewhere: compare sizes only
        formats = {name: {(w, h, None): n for (w, h, _), n in f.items()} for name, f in formats.items()}
    if len(set().union(*formats.values())) <= 1:
        return
    text = "; ".join(f"{name} " + ", ".join(f"{w}x{h}{'' if c is None else ' ' + c} ({n})"
                                            for (w, h, c), n in f.items())
                     for name, f in formats.items())
    if not cfg.resize:
        raise DataError(f"images of different sizes or channel counts ({text}); give samples and training images "
                        "of one format, or --set resize=true to compare them all resized to "
                        f"{cfg.image_size}x{cfg.image_size}")
    notes.append(f"images of different sizes or channel counts, all resized to {cfg.image_size}x{cfg.image_size} "
                 f"(resize: true): {text}")
    log.warning("memorization: %s", notes[-1])


@dataclass
class Search:
    """The nearest-neighbour search of the samples (and of the held-out reference) in the training set."""

    nb: Neighbours
    tests: dict
    ref_tests: dict | None
    seconds: dict


def _tests(loader: Loader, images: ImageSet, f_train, cfg: MemorizationConfig, tmp_dir: Path, name: str, device):
    """Features of one image set, their neighbours in the training set and the per-image tests."""
    feats = loader.features(images, tmp_dir, name)
    nb = blocked_search(feats, f_train, k=cfg.k, n=cfg.n, memory_gb=cfg.memory_gb, device=device)
    tests = neighbour_tests(nb, cfg)
    tests["shift_ratio"] = shift_ratio(feats, f_train, nb, n=cfg.n, shift=cfg.shift, map_shape=feats.map_shape,
                                       memory_gb=cfg.memory_gb, device=device)
    return nb, tests


def _search(loader: Loader, train: ImageSet, samples: ImageSet, reference: ImageSet | None, cfg: MemorizationConfig,
            out: Path | None, device) -> Search:
    """Features in a temporary folder beside the report (they may be large), then the searches."""
    t0 = time.monotonic()
    work = Path(out) if out is not None else Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".memorization-", dir=work) as tmp:
        tmp_dir = Path(tmp)
        f_train = loader.features(train, tmp_dir, "train")
        t_feat = time.monotonic()
        nb, tests = _tests(loader, samples, f_train, cfg, tmp_dir, "samples", device)
        ref_tests = None
        if reference is not None and len(reference):
            ref_tests = _tests(loader, reference, f_train, cfg, tmp_dir, "reference", device)[1]
    return Search(nb, tests, ref_tests, {"feature_seconds": t_feat - t0, "search_seconds": time.monotonic() - t_feat})


def _describe(judged: dict, cfg: MemorizationConfig, n_train: int, ref_tests: dict | None) -> None:
    """Add to each test of the verdict its parameters and what its distance means."""
    judged["tests"]["tiled_l2"].update(
        {"alpha": cfg.alpha, "n": min(cfg.n, n_train), "tiles": cfg.tiles * cfg.tiles,
         "distance": "largest L2 distance between corresponding tiles of the zero-mean, unit-norm "
                     "feature vectors; memorized when the distance to the nearest training image "
                     "/ the mean distance to the n nearest < alpha (Carlini et al. 2023)"})
    judged["tests"]["nn_ratio"].update(
        {"threshold": cfg.ratio, "distance": "global L2 distance of the zero-mean, unit-norm feature vectors, "
                                             "sqrt(2 - 2 cos); memorized when nearest / second-nearest < threshold"})
    if ref_tests is not None:
        judged["tests"]["above_reference"].update(
            {"threshold": float(ref_tests["similarity"].max()),
             "meaning": "similarity to the nearest training image above every held-out image's"})


def _summary(found: Search, judged: dict, train: ImageSet, samples: ImageSet, reference: ImageSet | None,
             cfg: MemorizationConfig, inputs: dict, quality: tuple[dict, dict], order: np.ndarray,
             notes: list[str]) -> dict:
    """``summary.json``'s content (JSON-safe)."""
    tests, ref_tests = found.tests, found.ref_tests
    return _json_safe({
        "format": SUMMARY_FORMAT,
        "inputs": inputs,
        "feature": cfg.feature,
        "counts": {"generated": len(samples), "training": len(train), "reference": len(reference or [])},
        "memorized": judged["memorized"],
        "tests": {name: judged["tests"].get(name) for name in
                  ("calibrated", "tiled_l2", "nn_ratio", "above_reference", "either", "both")},
        "similarity": "cosine similarity of the zero-mean, unit-norm feature vectors (1: identical up to brightness "
                      "and contrast)",
        "similarity_percentiles": {"generated": _percentiles(tests["similarity"]),
                                   "reference": _percentiles(ref_tests["similarity"]) if ref_tests else None},
        "shift_ratio_percentiles": {"generated": _percentiles(tests["shift_ratio"]),
                                    "reference": _percentiles(ref_tests["shift_ratio"]) if ref_tests else None},
        "reference": judged["reference"],
        "quality": quality[0],
        "inception_fid": quality[1],
        "top_matches": [{"sample": samples.names[i], "nearest": train.names[found.nb.index[i, 0]],
                         "similarity": float(tests["similarity"][i])} for i in order],
        "search": {**found.nb.stats, **found.seconds},
        "config": to_dict(cfg),
        "notes": notes,
    })


def _write_report(out: Path, summary: dict, found: Search, calibrated, loader: Loader, train: ImageSet,
                  samples: ImageSet, cfg: MemorizationConfig, order: np.ndarray) -> None:
    """per_sample.csv, summary.json, histogram.png and top_matches.png (sample | nearest training image)."""
    tests, ref_tests, nb = found.tests, found.ref_tests, found.nb
    above = tests["similarity"] > ref_tests["similarity"].max() if ref_tests else None
    write_per_sample(out / "per_sample.csv", samples, train, nb, tests, above, calibrated)
    atomic_write_json(out / "summary.json", summary)
    write_histogram(out / "histogram.png", tests, ref_tests, summary["memorized"], cfg.feature)
    size = cfg.image_size
    columns = [to_uint8(loader.images(samples, order, size)), to_uint8(loader.images(train, nb.index[order, 0], size))]
    save_png(grid(columns), out / "top_matches.png", upscale=max(1, 128 // size))
    log.info("memorization: %d of %d samples flagged (%s); wrote %s", summary["memorized"]["count"],
             len(samples), summary["memorized"]["criterion"], out)


def _evaluate(train: ImageSet, samples: ImageSet, reference: ImageSet | None, cfg: MemorizationConfig,
              out: Path | None, device: str | torch.device | None, inputs: dict, notes: list[str]) -> dict:
    device = get_device(str(device) if device else None)
    loader = Loader(cfg, device, cfg.autoencoder or train.checkpoint or samples.checkpoint)
    if len(train) < 2:
        raise DataError(f"{train.source}: {len(train)} training image(s); the tests need at least 2")
    check_formats({"training": train, "samples": samples, "reference": reference}, loader, cfg, notes)
    if len(train) < cfg.n:
        notes.append(f"{len(train)} training images: the tiled L2 test averages over {len(train)}, not n={cfg.n}")
    found = _search(loader, train, samples, reference, cfg, out, device)
    judged, found.tests["memorized"], calibrated = verdict(found.tests, found.ref_tests, cfg.criterion,
                                                           cfg.calibration_rate)
    if "warning" in judged["memorized"]:
        notes.append(judged["memorized"]["warning"])
    if found.ref_tests is None:
        notes.append("no held-out reference images: give --reference, or a training manifest/store with a "
                     f"'{cfg.reference_split}' split, to calibrate the verdict; the headline is uncalibrated")
    quality = _quality(loader, train, samples, reference, cfg)
    order = np.argsort(-found.tests["similarity"], kind="stable")[:cfg.top_matches]
    _describe(judged, cfg, len(train), found.ref_tests)
    summary = _summary(found, judged, train, samples, reference, cfg, inputs, quality, order, notes)
    if out is not None:
        _write_report(Path(out), summary, found, calibrated, loader, train, samples, cfg, order)
    return summary


def evaluate_memorization(train: str | Path, samples: str | Path, out: str | Path, *,
                          reference: str | Path | None = None, config: MemorizationConfig | dict | None = None,
                          device: str | torch.device | None = None, **options: Any) -> dict:
    """Compare generated samples with the training set; write per_sample.csv, summary.json and the plots.

    ``train``: a manifest CSV (its ``train`` split, or every row without a split column) or a latent store
    (rows with split ``train``). ``samples``: a folder of PNGs (with or without ``samples.zarr``), a
    samples store or a manifest. ``reference``: held-out real images (every row); by default the
    ``reference_split`` rows of ``train``. Options are :class:`MemorizationConfig` keys (``feature="latent"``
    ...). Returns the summary written to ``OUT/summary.json``.
    """
    cfg = memorization_config(config, **options)
    everything = open_image_set(train)
    notes: list[str] = []
    if everything.split is not None:
        train_set = everything.subset(np.flatnonzero(everything.split == "train"))
        if not len(train_set):
            raise DataError(f"{everything.source}: no rows with split 'train'")
    else:
        train_set = everything
        notes.append(f"{everything.source} has no split column: every row counts as a training image")
    if reference is not None:
        ref_set = open_image_set(reference)
        overlap = len(set(p for p in ref_set.paths if p) & set(p for p in train_set.paths if p))
        if overlap:
            notes.append(f"{overlap} reference image file(s) are also training images")
            log.warning("%s: %d reference image(s) are also training images", ref_set.source, overlap)
        ref_desc = str(reference)
    elif everything.split is not None and (everything.split == cfg.reference_split).any():
        ref_set = everything.subset(np.flatnonzero(everything.split == cfg.reference_split))
        ref_desc = f"{train} (split '{cfg.reference_split}')"
    else:
        ref_set, ref_desc = None, None
    sample_set = open_image_set(samples)
    inputs = {"train": str(train), "samples": str(samples), "reference": ref_desc}
    return _evaluate(train_set, sample_set, ref_set, cfg, Path(out), device, inputs, notes)


def _generate(model, n: int, batch: int) -> torch.Tensor:
    """n images (N, C, H, W) in [-1, 1] from ``model.sample(n)`` or a callable ``n -> images``."""
    fn = model.sample if hasattr(model, "sample") else model
    if not callable(fn):
        raise TypeError("model must have a sample(n) method or be a callable n -> images (N, C, H, W) in [-1, 1]")
    out, left = [], n
    while left > 0:
        x = fn(min(batch, left))
        x = x["image"] if isinstance(x, dict) else x
        out.append(torch.as_tensor(x).detach().float().cpu())
        left -= len(out[-1])
    return torch.cat(out)[:n]


def _collect(batches: Iterable, limit: int | None) -> torch.Tensor:
    """Images (N, C, H, W) from a dataloader yielding tensors or dicts with "image" (at most ``limit``)."""
    out, count = [], 0
    for batch in batches:
        x = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        out.append(torch.as_tensor(x).detach().float().cpu())
        count += len(out[-1])
        if limit is not None and count >= limit:
            break
    if not out:
        raise ValueError("the dataloader yielded no images")
    return torch.cat(out)[:limit]


def checkpoint_images(checkpoint: str | Path, n: int, *, seed: int = 42, device: str | torch.device | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """n decoded samples (N, 3, H, W) in [-1, 1] of a trained diffusion checkpoint, with its sampler and
    autoencoder (a class-conditional model cycles through the classes, as ``ldmflow sample`` does)."""
    from ldmflow.checkpoints import load_diffusion, verified_autoencoder
    from ldmflow.diffusion.generate import decode_latents, generate, seeded_noise
    from ldmflow.diffusion.schedules import NoiseSchedule

    dev = get_device(str(device) if device else None)
    loaded = load_diffusion(checkpoint, dev)
    cfg, info = loaded.config, loaded.meta.latents
    k = loaded.meta.num_classes
    noise, gen = seeded_noise(n, info.latent_shape, seed=seed, device=dev)
    z = generate(loaded.model, NoiseSchedule.from_config(cfg.diffusion).to(dev), noise,
                 labels=torch.arange(n) % k if k else None, sampling=cfg.sampling, prediction=cfg.diffusion.prediction,
                 generator=gen, batch_size=batch_size)
    _, pixels = decode_latents(verified_autoencoder(info, dev).model, z, info.scale_factor, batch_size=batch_size)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)


def _training_set(data: Any, limit: int | None) -> ImageSet:
    """The training images of ``data``: a manifest, image folder or latent store (its ``train`` rows), a
    dataset or dataloader of images (or dicts with ``"image"``), or a tensor (N, 3, H, W); the first ``limit``."""
    if isinstance(data, (str, Path)):
        images = open_image_set(data)
        if images.split is not None:
            images = images.subset(np.flatnonzero(images.split == "train"))
        return images.subset(np.arange(min(len(images), limit if limit is not None else len(images))))
    if torch.is_tensor(data):
        return tensor_image_set(data[:limit], "train")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=64)
    return tensor_image_set(_collect(data, limit), "train")


def check_memorization(checkpoint_or_model: Any, data: Any, num_generate: int = 100, num_training: int | None = None,
                       *, reference: Iterable | None = None, out: str | Path | None = None,
                       device: str | torch.device | None = None, seed: int = 42, **options: Any) -> dict:
    """Generate ``num_generate`` images and test them against ``num_training`` training images.

    ``checkpoint_or_model``: a trained diffusion checkpoint (``.pt``; sampled with its own sampler and
    autoencoder, seeded by ``seed``), an object with a ``sample(n)`` method, or a callable ``n -> images``
    (N, 3, H, W) in [-1, 1]. ``data``: a manifest, image folder or latent store (its ``train`` rows), a dataset
    or dataloader yielding images or dicts with ``"image"``, or a tensor of images. ``reference`` (held-out
    images) likewise. Options are :class:`MemorizationConfig` keys. Returns the summary dict; writes the
    report files too when ``out`` is given.

    >>> import torch
    >>> from ldmflow import check_memorization
    >>> train = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    >>> copier = lambda n: train[:n].clone()  # a "model" that returns training images
    >>> summary = check_memorization(copier, train, num_generate=5, num_training=20, n=10, image_size=16)
    >>> summary["memorized"]["fraction"], summary["counts"]["training"]
    (1.0, 20)
    """
    cfg = memorization_config(None, **options)
    if isinstance(checkpoint_or_model, (str, Path)):
        images = checkpoint_images(checkpoint_or_model, num_generate, seed=seed, device=device,
                                   batch_size=cfg.batch_size)
        generated_by = str(checkpoint_or_model)
    else:
        images, generated_by = _generate(checkpoint_or_model, num_generate, cfg.batch_size), "model"
    samples = tensor_image_set(images, "sample")
    train = _training_set(data, num_training)
    ref = _training_set(reference, None) if reference is not None else None
    inputs = {"train": str(data) if isinstance(data, (str, Path)) else "dataloader", "samples": generated_by,
              "reference": "dataloader" if ref is not None else None}
    return _evaluate(train, samples, ref, cfg, Path(out) if out is not None else None, device, inputs, [])


def compute_sample_similarity(samples: torch.Tensor, training_data: torch.Tensor, *, feature_size: int | None = None,
                              memory_gb: float = 1.0, device: str | torch.device | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest training item of each sample: indices (N,) and cosine similarities (N,) of the normalised vectors.

    Takes images (N, C, H, W) or any (N, ...) tensors; with ``feature_size`` images are resized to it first.

    >>> import torch
    >>> from ldmflow import compute_sample_similarity
    >>> train = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> index, similarity = compute_sample_similarity(train[[3, 7]] * 0.5 + 0.1, train)
    >>> index.tolist(), [round(s, 4) for s in similarity.tolist()]
    ([3, 7], [1.0, 1.0])
    """
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().float().cpu()
        if feature_size is not None and x.ndim == 4:
            x = F.interpolate(x, size=(feature_size, feature_size), mode="bilinear", antialias=True,
                              align_corners=False)
        v = x.reshape(len(x), -1)
        v = v - v.mean(1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    a, b = prep(samples), prep(training_data)
    if len(b) == 1:  # the search needs two items; one training item is its own nearest
        return torch.zeros(len(a), dtype=torch.long), (a @ b.T)[:, 0]
    nb = blocked_search(a, b, k=2, n=2, memory_gb=memory_gb, device=device)
    return torch.from_numpy(nb.index[:, 0]), torch.from_numpy(nb.similarity[:, 0])
