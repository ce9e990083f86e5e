import typing

import numpy as np
import pytest
import torch
from PIL import Image

from ldmflow.config.controlnet import ControlConfig
from ldmflow.data.controls import (
    SIGNALS,
    Signal,
    control_channels,
    control_preview,
    edges_from_rgb,
    manifest_controls,
    sobel_edges,
    to_model_input,
)
from ldmflow.errors import ControlError


def test_signals_match_the_config_type():
    assert set(SIGNALS) == set(typing.get_args(Signal)) == \
        set(typing.get_args(typing.get_type_hints(ControlConfig)["signal"]))


def test_sobel_finds_a_vertical_edge_and_nothing_on_flat_ground():
    gray = torch.zeros(1, 1, 8, 8)
    gray[..., 4:] = 1.0
    edges = sobel_edges(gray)[0, 0]
    assert edges.max() == 1.0
    assert torch.equal(edges[:, :3], torch.zeros(8, 3)) and torch.equal(edges[:, 5:], torch.zeros(8, 3))
    assert (edges[:, 3:5] == 1.0).all()
    assert torch.equal(sobel_edges(torch.full((1, 1, 8, 8), 0.3)), torch.zeros(1, 1, 8, 8))


def test_edges_of_rgb_images_are_uint8_maps():
    img = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    img[0, 2:6, 2:6] = 255
    edges = edges_from_rgb(img)
    assert edges.shape == (2, 1, 8, 8) and edges.dtype == np.uint8
    assert edges[0].max() == 255 and edges[1].max() == 0 and edges[0, 0, 0, 0] == 0


@pytest.mark.parametrize("signal", SIGNALS)
def test_every_signal_becomes_a_model_input_and_a_preview(signal):
    k = control_channels(signal, 4)
    raw = torch.randint(0, 4, (2, 8, 8)) if signal == "mask" else torch.randint(0, 256, (2, k, 8, 8), dtype=torch.uint8)
    control = to_model_input(signal, raw, 4)
    assert control.shape == (2, k, 8, 8) and control.dtype == torch.float32
    assert control.min() >= -1 and control.max() <= 1
    if signal == "mask":
        assert torch.equal(control.argmax(1), raw) and torch.equal(control.sum(1), torch.ones(2, 8, 8))
    preview = control_preview(signal, control)
    assert preview.shape == (2, 8, 8, 3) and preview.dtype == np.uint8


def test_a_stored_uint8_mask_becomes_the_one_hot_of_its_class_ids():
    ids = torch.randint(0, 4, (2, 8, 8))
    expected = to_model_input("mask", ids, 4)
    assert torch.equal(to_model_input("mask", ids.to(torch.uint8)[:, None], 4), expected)  # (N, 1, H, W) uint8


def test_mask_control_needs_masks():
    with pytest.raises(ControlError, match="needs a latent store with masks.*allowed without masks: 'edges', 'image'"):
        control_channels("mask", None)


def write_manifest(root, rows, columns=("image", "control")):
    lines = [",".join(columns)] + [",".join(r) for r in rows]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def png(path, size, value=0, mode="RGB"):
    Image.new(mode, size, value if mode != "RGB" else (value,) * 3).save(path)
    return str(path)


def test_manifest_controls_follow_the_store_rows(tmp_path):
    images = [png(tmp_path / f"i{i}.png", (10, 8)) for i in range(2)]
    png(tmp_path / "c0.png", (10, 8), 255, "L")
    png(tmp_path / "c1.png", (10, 8), 0)
    manifest = write_manifest(tmp_path, [("i0.png", "c0.png"), ("i1.png", "c1.png")])
    out = manifest_controls(manifest, [images[1], images[0]], 8)  # the store's row order, not the manifest's
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[1].min() == 255


def test_a_missing_control_column_is_named(tmp_path):
    image = png(tmp_path / "i0.png", (8, 8))
    manifest = write_manifest(tmp_path, [("i0.png", "0")], columns=("image", "label"))
    with pytest.raises(ControlError, match="needs a 'control' column in the manifest; found columns: image, label"):
        manifest_controls(manifest, [image], 8)


def test_a_control_image_of_the_wrong_size_is_named(tmp_path):
    image = png(tmp_path / "i0.png", (10, 8))
    png(tmp_path / "c0.png", (8, 8))
    manifest = write_manifest(tmp_path, [("i0.png", "c0.png")])
    with pytest.raises(ControlError, match=r"row 1: control image .*c0.png is 8x8 but its image .*i0.png is 10x8"):
        manifest_controls(manifest, [image], 8)


def test_missing_control_files_and_rows_are_named(tmp_path):
    image = png(tmp_path / "i0.png", (8, 8))
    manifest = write_manifest(tmp_path, [("i0.png", "nope.png")])
    with pytest.raises(ControlError, match="row 1: control file not found: .*nope.png"):
        manifest_controls(manifest, [image], 8)
    with pytest.raises(ControlError, match="no manifest row has the image .*other.png"):
        manifest_controls(manifest, [str(tmp_path / "other.png")], 8)
