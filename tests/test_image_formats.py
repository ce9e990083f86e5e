"""Images as labs have them: 8/16/32-bit grayscale, RGB(A), palette, multi-page TIFF channel stacks, class
folders; each must stay itself through decoding and embedding, and a changed input starts a fresh run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmflow.artifacts import load_checkpoint
from ldmflow.config.common import DataConfig, IntensityConfig
from ldmflow.data.dataset import ImageDataset, prepare_data
from ldmflow.data.images import from_unit_range
from ldmflow.data.latent_store import LatentStore
from ldmflow.data.manifest import read_manifest
from ldmflow.errors import DataError
from ldmflow.stages.embed import embed_latents
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.workflow import controlnets_for_data

from .conftest import REPO, TINY_AE

N, SIDE = 8, 20  # 8 images of 20 x 20 px, trained at 16 px


def digit(i: int) -> np.ndarray:
    """A (SIDE, SIDE) float pattern in [0, 1] that differs per image: a bar at row/column i, a smooth ramp."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    img = 0.3 * (xx if i % 2 else yy)
    img[2 + 2 * i:4 + 2 * i, :] = 1.0
    img[:, 2 + i:3 + i] = 0.8
    return img


def write(folder: Path, fmt: str) -> Path:
    """N images of one format into FOLDER (class subfolders for 'folders'); returns what to give data.manifest."""
    folder.mkdir(parents=True)
    for i in range(N):
        p = digit(i)
        name = folder / f"{i:02d}"
        if fmt in ("png16", "tif16"):  # a 12-bit camera with a dark offset in a 16-bit file: 1000..4095
            suffix = ".png" if fmt == "png16" else ".tif"
            Image.fromarray((1000 + p * 3095).astype(np.uint16)).save(name.with_suffix(suffix))
        elif fmt == "tif16b":  # big-endian 16-bit
            raw = (1000 + p * 3095).astype(">u2")
            Image.frombytes("I;16B", (SIDE, SIDE), raw.tobytes()).save(name.with_suffix(".tif"))
        elif fmt == "L":
            Image.fromarray((p * 255).astype(np.uint8), "L").save(name.with_suffix(".png"))
        elif fmt == "RGBA":  # colour in RGB, alpha 255 on the pattern and 128 elsewhere
            rgb = np.stack([p, 1 - p, np.full_like(p, 0.5)], -1) * 255
            alpha = np.where(p > 0.5, 255, 128)[..., None]
            Image.fromarray(np.concatenate([rgb, alpha], -1).astype(np.uint8), "RGBA").save(name.with_suffix(".png"))
        elif fmt == "P":
            rgb = (np.stack([p, p * 0.5, 1 - p], -1) * 255).astype(np.uint8)
            Image.fromarray(rgb, "RGB").convert("P").save(name.with_suffix(".png"))
        elif fmt == "stack2":  # two 16-bit stains as a 2-page TIFF
            a = Image.fromarray((1000 + p * 3095).astype(np.uint16))
            b = Image.fromarray((500 + p.T * 2000).astype(np.uint16))
            a.save(name.with_suffix(".tif"), save_all=True, append_images=[b])
        elif fmt == "folders":  # class subfolders, 8-bit RGB
            sub = folder / ("odd" if i % 2 else "even")
            sub.mkdir(exist_ok=True)
            Image.fromarray((np.stack([p] * 3, -1) * 255).astype(np.uint8), "RGB").save(sub / f"{i:02d}.png")
    return folder


FORMATS = {  # format: (data.channels given, channels expected, bit depth)
    "png16": (None, 1, 16), "tif16": (None, 1, 16), "tif16b": (None, 1, 16), "L": (None, 1, 8),
    "RGBA": (None, 3, 8), "P": (None, 3, 8), "stack2": (2, 2, 16), "folders": (None, 3, 8),
}


def pairwise_min_distance(x: torch.Tensor) -> float:
    """The smallest mean absolute difference between two different rows of x (N, ...)."""
    flat = x.flatten(1).float()
    d = (flat[:, None] - flat[None]).abs().mean(-1) + torch.eye(len(flat)) * 1e9
    return float(d.min())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_stays_different_through_decoding_and_embedding(fmt, tmp_path):
    given, channels, bits = FORMATS[fmt]
    data_dir = write(tmp_path / fmt, fmt)
    data = prepare_data(data_dir, DataConfig(image_size=16, channels=given, val_fraction=0.25))
    assert data.channels == channels and data.source_bits == bits
    x = ImageDataset(data, None).__getitems__(list(range(N)))["image"]  # (N, C, 16, 16)
    assert x.shape == (N, channels, 16, 16)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x.max() - x.min()) > 1.5, "contrast lost in decoding"
    assert pairwise_min_distance(x) > 0.01, "two different images decode to the same pixels"
    if bits > 8:  # the range is kept with the data
        assert data.value_range is not None and len(data.value_range) == channels
        lo, hi = data.value_range[0]  # percentiles of the train pixels
        assert 1000 <= lo < 1300 and 3800 < hi <= 4095, data.value_range

    cfg = {**TINY_AE, "data": {"image_size": 16, "batch_size": 4, "channels": given, "val_fraction": 0.25},
           "train": {"epochs": 1, "sample_every": 1}}
    run = tmp_path / "run"
    train_autoencoder(cfg, data_dir, run, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "tiny_checkpoint_best.pt")
    assert ckpt["config"]["data"]["channels"] == channels
    assert ckpt["config"]["data"]["intensity"]["source_bits"] == bits
    store = LatentStore(embed_latents(run / "checkpoints" / "tiny_checkpoint_best.pt", data_dir,
                                      tmp_path / "latents.zarr", threads=1))
    assert store.attrs["channels"] == channels
    assert store.attrs["intensity"]["range"] == data.value_range
    latents = torch.from_numpy(store.latents[:].astype(np.float32))
    spread = float(latents.flatten(1).std(0).mean())
    print(f"{fmt}: decoded range [{float(x.min()):.3f}, {float(x.max()):.3f}], latent spread across images "
          f"{spread:.4f}")
    assert spread > 1e-3 and pairwise_min_distance(latents) > 0, "different images embed to the same latent"


def test_sixteen_bit_rules_and_write_back(tmp_path):
    data_dir = write(tmp_path / "png16", "png16")
    by_depth = prepare_data(data_dir, DataConfig(image_size=16,
                                                 intensity=IntensityConfig(mode="bit_depth", bit_depth=12)))
    assert by_depth.value_range == [[0.0, 4095.0]]
    x = ImageDataset(by_depth, None).__getitems__(list(range(N)))["image"]
    # 1000..4095 of 0..4095: the dark offset stays (about -0.51), the top reaches 1
    assert -0.55 < float(x.min()) < -0.45 and float(x.max()) > 0.99
    fixed = prepare_data(data_dir, DataConfig(image_size=16, intensity=IntensityConfig(range=[[1000, 4095]])))
    y = ImageDataset(fixed, None).__getitems__(list(range(N)))["image"]
    back = from_unit_range(y, fixed.value_range, 16)  # (N, 16, 16, 1) uint16: the data's own values
    assert back.dtype == np.uint16 and back.min() >= 1000 and back.max() <= 4095 and back.max() - back.min() > 3000


def test_grayscale_is_not_tripled_and_rgb_can_be_luma(tmp_path):
    data_dir = write(tmp_path / "L", "L")
    assert prepare_data(data_dir, DataConfig(image_size=16)).channels == 1
    tripled = prepare_data(data_dir, DataConfig(image_size=16, channels=3))  # only when asked
    assert tripled.images.shape[-1] == 3 and (tripled.images[..., 0] == tripled.images[..., 2]).all()
    rgb_dir = write(tmp_path / "P", "P")
    assert prepare_data(rgb_dir, DataConfig(image_size=16, channels=1)).images.shape[-1] == 1


def test_rgba_is_composited_on_black(tmp_path):
    path = tmp_path / "a.png"
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200  # a colour hidden under alpha 0 on the left half
    rgba[:, 8:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    data = prepare_data(tmp_path, DataConfig(image_size=16))
    assert (data.images[0, :, :8] == 0).all() and (data.images[0, :, 8:] == 200).all()


def test_multipage_tiff_is_rejected_naming_the_row(tmp_path):
    data_dir = write(tmp_path / "stack2", "stack2")
    with pytest.raises(DataError, match=r"row 1: image .*00\.tif is a multi-page file \(2 pages\); set "
                                        r"data\.channels: 2"):
        prepare_data(data_dir, DataConfig(image_size=16))
    with pytest.raises(DataError, match=r"row 1: .* multi-page file \(2 pages\)"):
        prepare_data(data_dir, DataConfig(image_size=16, channels=3))


def test_class_folders_give_labels_masks_and_a_stable_split(tmp_path):
    root = tmp_path / "set"
    write(root / "images", "folders")
    for img in (root / "images").rglob("*.png"):
        mask = root / "masks" / img.relative_to(root / "images")
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.asarray(Image.open(img))[..., 0] > 128).astype(np.uint8), "L").save(mask)
    data = prepare_data(root, DataConfig(image_size=16, val_fraction=0.25))
    assert data.classes == ["even", "odd"] and data.mask_classes == 2 and data.masks is not None
    assert [data.classes[k] for k in data.labels] == [Path(p).parent.name for p in data.paths]
    assert (prepare_data(root / "images", DataConfig(image_size=16, val_fraction=0.25)).split == data.split).all()
    (root / "masks" / "odd" / "01.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*odd/01\.png"):
        read_manifest(root)


def test_changed_input_starts_a_fresh_run_and_moves_the_old_one_aside(tmp_path):
    data_dir = write(tmp_path / "L", "L")
    cfg = {**TINY_AE, "data": {"image_size": 16, "batch_size": 4}, "train": {"epochs": 1, "sample_every": 1}}
    run = tmp_path / "run"
    first = train_autoencoder(cfg, data_dir, run, progress=False)
    fingerprint = load_checkpoint(run / "checkpoints" / "tiny_checkpoint_latest.pt")["extra"]["data_fingerprint_sha256"]
    assert train_autoencoder(cfg, data_dir, run, progress=False)["resumed_from"] is not None  # same data: resumes
    assert not (run / "previous").exists()

    changed = data_dir / "03.png"
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8), "L").save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    second = train_autoencoder(cfg, data_dir, run, progress=False)
    assert second["resumed_from"] is None and first["resumed_from"] is None
    new = load_checkpoint(run / "checkpoints" / "tiny_checkpoint_best.pt")["extra"]["data_fingerprint_sha256"]
    assert new != fingerprint
    old = load_checkpoint(run / "previous" / "checkpoints" / "tiny_checkpoint_best.pt")
    assert old["extra"]["data_fingerprint_sha256"] == fingerprint
    assert (run / "previous" / "samples" / "epoch_001.png").is_file()


def test_labelled_manifest_without_masks_plans_no_mask_controlnet(tmp_path, capsys):
    data_dir = write(tmp_path / "set", "folders")
    controlnets = {p.stem: str(p) for p in sorted((REPO / "config" / "controlnet").glob("*.yaml"))}
    assert controlnets_for_data(controlnets, str(data_dir)) == {}
    assert "has no masks; left out the mask-controlled ControlNet" in capsys.readouterr().err
    assert controlnets_for_data(controlnets, str(tmp_path / "not_written_yet.csv")) == controlnets  # the demo


def labelled_16bit_manifest(folder: Path, n: int = 24) -> Path:
    """A CSV manifest of n 16-bit grayscale images labelled 0..3 (digits-like), with no masks."""
    folder.mkdir(parents=True)
    rows = ["image,label"]
    for i in range(n):
        p = digit(i % N)
        Image.fromarray((1000 + p * 3095).astype(np.uint16)).save(folder / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{i % 4}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_workflow_plans_a_labelled_manifest_without_masks(tmp_path):
    from .test_workflow import planned_jobs, smk, tiny_workflow

    root = tiny_workflow(tmp_path / "wf")
    manifest = labelled_16bit_manifest(tmp_path / "digits")
    proc = smk(root, "-n", "--config", f"data={{manifest: {manifest}}}")
    plan = planned_jobs(proc)
    assert "left out the mask-controlled ControlNet experiment(s)" in proc.stderr
    assert not any("controlnet" in rule for rule in plan) and "demo_data" not in plan
    assert plan["train_autoencoder"] == 2 and plan["train_diffusion"] == 2 and plan["sample_diffusion"] == 2


def test_samples_are_written_in_the_datas_own_values(tmp_path):
    from ldmflow.config.autoencoder import AutoencoderModelConfig
    from ldmflow.metadata import SamplesAttrs
    from ldmflow.models.autoencoder import Autoencoder
    from ldmflow.samples import save_data_values, save_samples
    from ldmflow.viz import to_pixels

    model_cfg = AutoencoderModelConfig(variant="plain", downsample=4, latent_channels=4, base_channels=8)
    gray = Autoencoder(model_cfg, image_channels=1).eval()
    latents = torch.randn(3, 4, 4, 4).numpy()
    folder = save_data_values(tmp_path / "gray", latents, gray, {"range": [[1000.0, 4095.0]], "source_bits": 16})
    img = Image.open(folder / "sample_00000.png")
    values = np.asarray(img)
    assert img.mode == "I;16" and img.size == (16, 16) and values.min() >= 1000 and values.max() <= 4095
    with torch.no_grad():
        pixels = to_pixels(gray.decode(torch.from_numpy(latents))[0])  # (3, 16, 16, 1)
    attrs = SamplesAttrs(checkpoint="c.pt", checkpoint_sha256="0", autoencoder_checkpoint="ae.pt",
                         autoencoder_sha256="0", sampler="ddim", steps=1, eta=0.0, guidance=None, seed=0,
                         classes=None, ldmflow_version="0")
    save_samples(tmp_path / "gray", pixels, latents, np.full(3, -1), attrs)
    assert Image.open(tmp_path / "gray" / "sample_00000.png").mode == "L"  # grayscale is not tripled

    stack = Autoencoder(model_cfg, image_channels=2).eval()
    folder = save_data_values(tmp_path / "stack", latents, stack, {"range": [[0.0, 65535.0]] * 2, "source_bits": 16})
    tif = Image.open(folder / "sample_00000.tif")
    assert tif.n_frames == 2 and tif.mode == "I;16"
