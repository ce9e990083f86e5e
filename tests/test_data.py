import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldmflow.config.common import DataConfig
from ldmflow.data.dataset import ImageDataset, prepare_data
from ldmflow.data.demo import CLASSES, write_demo_data
from ldmflow.data.images import resize_center_crop
from ldmflow.data.manifest import assign_split, read_manifest
from ldmflow.errors import DataError


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_data_same_seed_same_bytes(tmp_path):
    a = write_demo_data(tmp_path / "a", n=12, size=16, seed=7).parent
    b = write_demo_data(tmp_path / "b", n=12, size=16, seed=7).parent
    c = write_demo_data(tmp_path / "c", n=12, size=16, seed=8).parent
    assert digest(a) == digest(b) != digest(c)


def test_demo_data_has_shapes_classes_and_imbalance(tmp_path):
    manifest = write_demo_data(tmp_path, n=200, size=24, seed=1)
    table = pd.read_csv(manifest)
    assert list(table.columns) == ["image", "mask", "label"]
    counts = table["label"].value_counts()
    assert set(counts.index) == set(CLASSES)
    assert counts["circle"] > 2 * counts["triangle"]  # deliberate imbalance
    ids = set()
    for m in table["mask"][:50]:
        arr = np.asarray(Image.open(tmp_path / m))
        assert arr.shape == (24, 24)
        ids |= set(np.unique(arr).tolist())
    assert ids == {0, 1, 2, 3}  # background + 3 shape classes


def test_prepare_caches_checks_and_splits(demo_manifest):
    data = prepare_data(demo_manifest, DataConfig(image_size=16, mask_classes=4), seed=42)
    assert data.images.shape == (40, 16, 16, 3) and data.masks.shape == (40, 16, 16)
    assert data.classes == sorted(CLASSES) and data.mask_classes == 4
    assert set(data.split) == {"train", "val"} and (data.split == "val").sum() == 6
    again = prepare_data(demo_manifest, DataConfig(image_size=16, mask_classes=4), seed=42)
    assert (again.split == data.split).all()
    batch = ImageDataset(data, "val").__getitems__([0, 1])
    assert batch["image"].shape == (2, 3, 16, 16) and -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["mask"].dtype.is_floating_point is False and batch["label"].shape == (2,)


def test_uncached_dataset_decodes_the_same_pixels(demo_manifest):
    cached = ImageDataset(prepare_data(demo_manifest, DataConfig(image_size=8, mask_classes=4)), "train")
    streamed = ImageDataset(prepare_data(demo_manifest, DataConfig(image_size=8, mask_classes=4, cache_max_gb=0)),
                            "train")
    assert streamed.data.images is None
    a, b = cached.__getitems__([3, 5]), streamed.__getitems__([3, 5])
    assert all((a[k] == b[k]).all() for k in a)


def test_resize_center_crop_keeps_aspect():
    img = Image.new("RGB", (40, 20), "red")
    out = resize_center_crop(img, 10, Image.Resampling.BICUBIC)
    assert out.size == (10, 10)


def test_split_is_deterministic_by_seed():
    assert (assign_split(50, 0.2, 1) == assign_split(50, 0.2, 1)).all()
    assert (assign_split(50, 0.2, 1) != assign_split(50, 0.2, 2)).any()
    assert (assign_split(50, 0.2, 1) == "val").sum() == 10


def test_folder_of_images_is_a_manifest(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 12), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    data = prepare_data(tmp_path, DataConfig(image_size=8))
    assert len(data.paths) == 3 and not data.has_masks and not data.has_labels


@pytest.fixture
def bad_manifest(tmp_path):
    """A copy of a 4-row demo manifest that each test breaks in one way."""
    manifest = write_demo_data(tmp_path, n=4, size=16, seed=0)
    return manifest, pd.read_csv(manifest)


def save(table, manifest):
    table.to_csv(manifest, index=False)


def test_missing_file_names_row_and_file(bad_manifest):
    manifest, table = bad_manifest
    table.loc[2, "image"] = "images/gone.png"
    save(table, manifest)
    with pytest.raises(DataError, match=r"manifest.csv: row 3: image file not found: .*gone.png"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4))


def test_corrupt_image_names_row_and_file(bad_manifest):
    manifest, table = bad_manifest
    (manifest.parent / table.loc[1, "image"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"row 2: cannot read image .*00001.png"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4))


def test_mask_size_mismatch_names_row(bad_manifest):
    manifest, table = bad_manifest
    Image.new("L", (8, 8)).save(manifest.parent / table.loc[0, "mask"])
    with pytest.raises(DataError, match=r"row 1: mask .*00000.png is 8x8 but its image .* is 16x16"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4))


def test_mask_id_out_of_range_names_row(bad_manifest):
    manifest, table = bad_manifest
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(manifest.parent / table.loc[3, "mask"])
    with pytest.raises(DataError, match=r"row 4: mask .* has class id 7; allowed ids 0..3"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4))


def test_unknown_label_names_row(bad_manifest):
    manifest, table = bad_manifest
    table.loc[1, "label"] = "hexagon"
    save(table, manifest)
    with pytest.raises(DataError, match=r"row 2: unknown label 'hexagon'; allowed: circle, square, triangle"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4, classes=["circle", "square", "triangle"]))


def test_unknown_column_and_split(bad_manifest):
    manifest, table = bad_manifest
    table["splt"] = "train"
    save(table, manifest)
    with pytest.raises(DataError, match="unknown manifest column.*splt"):
        read_manifest(manifest)
    table = table.drop(columns="splt")
    table["split"] = ["train", "val", "train", "tset"]
    save(table, manifest)
    with pytest.raises(DataError, match=r"row 4: unknown split 'tset'"):
        prepare_data(manifest, DataConfig(image_size=16, mask_classes=4))


def test_skip_bad_rows_counts_and_writes(bad_manifest, tmp_path):
    manifest, table = bad_manifest
    table.loc[0, "image"] = "images/gone.png"
    (manifest.parent / table.loc[1, "image"]).write_bytes(b"junk")
    save(table, manifest)
    data = prepare_data(manifest, DataConfig(image_size=16, mask_classes=4, skip_bad_rows=True))
    assert len(data.paths) == 2 and len(data.skipped) == 2
    data.write_skipped(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert report["count"] == 2 and [r["row"] for r in report["rows"]] == [1, 2]


def test_integer_labels_and_explicit_split(tmp_path):
    for i in range(4):  # four different images (identical files would be one image: see the duplicate tests)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"image": [f"{i}.png" for i in range(4)], "label": [0, 2, 2, 0],
                  "split": ["train", "train", "val", "test"]}).to_csv(tmp_path / "m.csv", index=False)
    data = prepare_data(tmp_path / "m.csv", DataConfig(image_size=8))
    assert data.classes == ["0", "1", "2"] and data.labels.tolist() == [0, 2, 2, 0]
    assert list(data.split) == ["train", "train", "val", "test"]
