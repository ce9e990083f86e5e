"""Masks and sizes as labs export them: 0/255 binary masks, JPEG masks, colour-coded masks, deep encodings,
tiny images and decompression bombs; each a right answer or an error that says what to set."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmflow.config.common import DataConfig
from ldmflow.data.dataset import ImageDataset, prepare_data
from ldmflow.errors import ConfigError, DataError

N = 6


def shapes(i: int) -> np.ndarray:
    """(16, 16) class ids 0..2: a square of class 1 that moves with i, a band of class 2."""
    ids = np.zeros((16, 16), np.uint8)
    ids[4:12, 2 + i % 4:10 + i % 4] = 1
    ids[0:3, :] = 2
    return ids


def dataset(root: Path, mask_of, suffix: str = "png", size: int = 16, save=None) -> Path:
    """N random RGB images of SIZE px with masks ``mask_of(i)`` saved as SUFFIX; returns the manifest."""
    rng = np.random.default_rng(0)
    rows = ["image,mask"]
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"i{i}.png")
        (save or (lambda a, p: Image.fromarray(a).save(p)))(mask_of(i), root / f"m{i}.{suffix}")
        rows.append(f"i{i}.png,m{i}.{suffix}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def masks_of(data) -> np.ndarray:
    return ImageDataset(data, None).__getitems__(list(range(len(data.paths))))["mask"].numpy()


@pytest.mark.parametrize("k", [255, 1, 38])
@pytest.mark.parametrize("cache_max_gb", [4.0, 0.0])
def test_masks_of_zero_and_one_other_value_are_binary_with_a_note(tmp_path, caplog, k, cache_max_gb):
    manifest = dataset(tmp_path, lambda i: (shapes(i) == 1).astype(np.uint8) * k)
    with caplog.at_level(logging.INFO):
        data = prepare_data(manifest, DataConfig(image_size=16, cache_max_gb=cache_max_gb))
    assert data.mask_classes == 2
    assert set(np.unique(masks_of(data)).tolist()) == {0, 1}
    if k > 1:
        assert f"only the values 0 and {k}: read as binary masks" in caplog.text


def test_binary_0_255_masks_with_mask_classes_2_are_read_as_0_1(tmp_path):
    manifest = dataset(tmp_path, lambda i: (shapes(i) == 1).astype(np.uint8) * 255)
    data = prepare_data(manifest, DataConfig(image_size=16, mask_classes=2, cache_max_gb=0.0))
    assert set(np.unique(masks_of(data)).tolist()) == {0, 1}


@pytest.mark.parametrize("spec", [{0: 0, 128: 1, 255: 2}, {"0": 0, "128": 1, "255": 2}, [0, 128, 255]])
def test_mask_values_map_another_encoding_to_class_ids(tmp_path, spec):
    manifest = dataset(tmp_path, lambda i: np.array([0, 128, 255], np.uint8)[shapes(i)])
    data = prepare_data(manifest, DataConfig(image_size=16, mask_values=spec))
    assert data.mask_classes == 3
    assert np.array_equal(masks_of(data)[2], shapes(2))


def test_a_value_that_mask_values_lacks_names_the_row_and_value(tmp_path):
    manifest = dataset(tmp_path, lambda i: np.array([0, 128, 255], np.uint8)[shapes(i)])
    with pytest.raises(DataError, match=r"row 1: mask .*m0.png has the value\(s\) 255, which data.mask_values"):
        prepare_data(manifest, DataConfig(image_size=16, mask_values=[0, 128]))


def test_more_than_32_inferred_classes_is_an_error_naming_the_values(tmp_path):
    manifest = dataset(tmp_path, lambda i: np.array([0, 128, 255], np.uint8)[shapes(i)])
    with pytest.raises(DataError, match=r"the masks hold the values 0, 128, 255 \(3 distinct\).*data.mask_values"):
        prepare_data(manifest, DataConfig(image_size=16))


@pytest.mark.parametrize("suffix,fmt", [("jpg", "JPEG"), ("webp", "WEBP")])
def test_a_lossy_mask_file_is_refused_saying_why(tmp_path, suffix, fmt):
    manifest = dataset(tmp_path, shapes, suffix, save=lambda a, p: Image.fromarray(a).save(p, fmt, quality=80))
    with pytest.raises(DataError, match=r"row 1: mask .* is a (JPEG|lossy WebP) file: lossy compression adds noise"):
        prepare_data(manifest, DataConfig(image_size=16))


def test_a_lossless_webp_mask_is_read(tmp_path):
    manifest = dataset(tmp_path, shapes, "webp", save=lambda a, p: Image.fromarray(a).save(p, "WEBP", lossless=True))
    data = prepare_data(manifest, DataConfig(image_size=16))
    assert np.array_equal(masks_of(data)[1], shapes(1))


PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)


@pytest.mark.parametrize("spec", [{"#000000": 0, "#ff0000": 1, "#00FF00": 2}, PALETTE.tolist()])
def test_a_colour_coded_mask_is_read_through_the_palette_mapping(tmp_path, spec):
    manifest = dataset(tmp_path, lambda i: PALETTE[shapes(i)])
    data = prepare_data(manifest, DataConfig(image_size=16, mask_palette=spec))
    assert data.mask_classes == 3
    assert np.array_equal(masks_of(data)[3], shapes(3))


def test_a_colour_coded_mask_without_a_mapping_names_the_key_to_set(tmp_path):
    manifest = dataset(tmp_path, lambda i: PALETTE[shapes(i)])
    with pytest.raises(DataError, match=r"row 1: mask .* is a colour-coded RGB mask; .* data.mask_palette"):
        prepare_data(manifest, DataConfig(image_size=16))


def test_a_colour_the_palette_lacks_is_named(tmp_path):
    manifest = dataset(tmp_path, lambda i: PALETTE[shapes(i)])
    with pytest.raises(DataError, match=r"has the colour\(s\) #00ff00, which data.mask_palette does not map"):
        prepare_data(manifest, DataConfig(image_size=16, mask_palette=["#000000", "#ff0000"]))


def test_a_gray_mask_saved_as_rgb_is_read_as_gray(tmp_path):
    manifest = dataset(tmp_path, lambda i: np.repeat(shapes(i)[..., None], 3, axis=-1))
    data = prepare_data(manifest, DataConfig(image_size=16))
    assert data.mask_classes == 3


@pytest.mark.parametrize("cfg,message", [
    ({"mask_values": [0, 1], "mask_palette": [[0, 0, 0]]}, "both set"),
    ({"mask_palette": ["red"]}, "allowed: '#rrggbb'"),
    ({"mask_values": {"x": 1}}, "raw value 'x'"),
    ({"mask_values": {0: -1}}, "allowed: class ids"),
])
def test_a_bad_mask_mapping_is_a_config_error_naming_the_key(tmp_path, cfg, message):
    manifest = dataset(tmp_path, shapes)
    with pytest.raises(ConfigError, match=message):
        prepare_data(manifest, DataConfig(image_size=16, **cfg))


def test_upscaling_beyond_x2_is_reported_once_with_the_count_and_smallest_size(tmp_path, caplog):
    manifest = dataset(tmp_path, lambda i: np.zeros((6, 6), np.uint8), size=6)
    with caplog.at_level(logging.WARNING):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=2))
    notes = [r.message for r in caplog.records if "upscaled" in r.message]
    assert len(notes) == 1 and f"{N} of {N} image(s)" in notes[0] and "short side of 6 px" in notes[0]


def test_max_upscale_makes_upscaling_an_error_or_a_skipped_row(tmp_path):
    manifest = dataset(tmp_path, lambda i: np.zeros((6, 6), np.uint8), size=6)
    with pytest.raises(DataError, match=r"row 1: image .* short side of 6 px: x2.67 .* beyond data.max_upscale 2"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=2, max_upscale=2.0))
    assert prepare_data(manifest, DataConfig(image_size=16, mask_classes=2, max_upscale=3.0)).paths


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims WIDTH x HEIGHT pixels, with almost no data (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 40_000])  # over Pillow's limit, and over twice it
def test_an_image_too_large_to_decode_is_a_named_row_error_or_skipped(tmp_path, side):
    manifest = dataset(tmp_path, shapes)
    png_header_only(tmp_path / "i2.png", side, side)
    with pytest.raises(DataError, match=r"row 3: image .*i2.png is too large to decode safely"):
        prepare_data(manifest, DataConfig(image_size=16))
    data = prepare_data(manifest, DataConfig(image_size=16, skip_bad_rows=True))
    assert len(data.paths) == N - 1 and "too large" in data.skipped[0]["reason"]
