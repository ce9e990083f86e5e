import json
import os
import shutil
import subprocess
import sys
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import ldmflow
from ldmflow.artifacts import file_sha256, load_checkpoint, save_checkpoint
from ldmflow.checkpoints import load_autoencoder, store_autoencoder
from ldmflow.data.dataset import prepare_data
from ldmflow.data.latent_store import STORE_FORMAT, LatentDataset, LatentStore
from ldmflow.errors import DataError, LatentError
from ldmflow.models.autoencoder import Autoencoder
from ldmflow.stages import embed
from ldmflow.stages.embed import RunningMoments, embed_latents
from ldmflow.stages.select_autoencoder import select_autoencoder
from ldmflow.stages.train_autoencoder import train_autoencoder

from .conftest import TINY_AE, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_manifest) -> dict[str, Path]:
    """Tiny KL and plain autoencoders (1 epoch each), and a selected.json naming the KL one."""
    root = tmp_path_factory.mktemp("ae")
    out = {}
    for variant in ("kl", "plain"):
        cfg = json.loads(json.dumps(TINY_AE))
        cfg["name"] = f"tiny_{variant}"
        cfg["model"]["variant"] = variant
        cfg["train"]["epochs"] = 1
        train_autoencoder(cfg, demo_manifest, root / variant, progress=False)
        out[variant] = root / variant / "checkpoints" / f"tiny_{variant}_checkpoint_best.pt"
    select_autoencoder([root / "kl"], root / "selected.json", plot=False)
    out["selected"] = root / "selected.json"
    return out


@pytest.fixture(scope="module")
def stores(runs, demo_manifest, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents")
    return {variant: embed_latents(runs[variant], demo_manifest, root / f"{variant}.zarr", batch_size=8, threads=1)
            for variant in ("kl", "plain")}


@pytest.mark.parametrize("variant", ["kl", "plain"])
def test_store_holds_every_row_as_the_data_layer_sees_it(variant, runs, stores, demo_manifest):
    loaded = load_autoencoder(runs[variant])
    model, cfg = loaded.model, loaded.config
    data = prepare_data(demo_manifest, cfg.data, cfg.seed)  # cached: images and masks in memory
    group = zarr.open_group(stores[variant], mode="r")
    n, size = len(data.paths), cfg.data.image_size
    h = size // cfg.model.downsample
    assert group["latents"].shape == (n, 4, h, h) and group["latents"].dtype == np.float16
    assert ("logvar" in group) == (variant == "kl")
    assert group["masks"].shape == (n, size, size) and group["masks"].dtype == np.uint8
    np.testing.assert_array_equal(group["masks"][:], data.masks)
    np.testing.assert_array_equal(group["labels"][:], data.labels)
    assert group["labels"].dtype == np.int64
    assert group["split"][:].tolist() == data.split.tolist()
    assert group["paths"][:].tolist() == data.paths
    with torch.no_grad():
        mean, logvar = model.encode(torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(group["latents"][:].astype(np.float32), mean.numpy(), rtol=2e-3, atol=2e-3)
    if variant == "kl":
        np.testing.assert_allclose(group["logvar"][:].astype(np.float32), logvar.numpy(), rtol=2e-3, atol=2e-3)


def test_provenance_and_scale_factor(runs, stores, demo_manifest):
    store = LatentStore(stores["kl"])
    a = store.attrs
    state = load_checkpoint(runs["kl"])
    assert a["format"] == STORE_FORMAT and a["ldmflow_version"] == ldmflow.__version__
    assert datetime.fromisoformat(a["created"]).tzinfo is not None
    assert a["autoencoder"]["sha256"] == file_sha256(runs["kl"])
    assert a["autoencoder"]["checkpoint"] == str(runs["kl"].resolve())
    assert a["autoencoder"]["config"] == state["config"]
    assert a["manifest"]["sha256"] == file_sha256(demo_manifest) and a["manifest"]["autoencoder_trained_on_it"]
    assert a["classes"] == ["circle", "square", "triangle"] and a["mask_classes"] == 4
    assert (a["image_size"], a["downsample"], a["latent_channels"], a["variant"]) == (16, 4, 4, "kl")
    assert store.n == 40 and sum(a["counts"].values()) == 40

    train = store.latents[:][store.indices("train")].astype(np.float64)  # (N_train, C, h, w)
    assert store.scale_factor == pytest.approx(1 / train.std(), rel=1e-9)
    np.testing.assert_allclose(a["channel_mean"], train.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a["channel_std"], train.std(axis=(0, 2, 3)), rtol=1e-9)
    logvar = store.logvar[:][store.indices("train")].astype(np.float64)
    np.testing.assert_allclose(a["posterior_var_mean"], np.exp(logvar).mean(axis=(0, 2, 3)), rtol=1e-9)
    assert "posterior_var_mean" not in LatentStore(stores["plain"]).attrs


def test_running_moments_match_numpy_across_batches():
    x = np.random.default_rng(0).normal(3.0, 2.0, (37, 3, 4, 4)).astype(np.float32)
    m = RunningMoments(3)
    for lo, hi in ((0, 5), (5, 6), (6, 6), (6, 37)):
        m.update(x[lo:hi])
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m.channel_std(), x.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-12)
    assert m.overall_std() == pytest.approx(x.astype(np.float64).std(), rel=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_dtype_and_selected_json(dtype, runs, stores, demo_manifest, tmp_path):
    out = embed_latents(runs["selected"], demo_manifest, tmp_path / "l.zarr", batch_size=16, dtype=dtype, threads=1)
    store = LatentStore(out)
    assert store.latents.dtype == np.dtype(dtype) and store.logvar.dtype == np.dtype(dtype)
    assert store.attrs["autoencoder"]["selected"] == str(runs["selected"].resolve())
    reference = LatentStore(stores["kl"])  # float16, batch 8
    np.testing.assert_allclose(store.latents[:].astype(np.float32), reference.latents[:].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert store.scale_factor == pytest.approx(reference.scale_factor, rel=1e-3)


def test_bad_options_name_the_key_and_the_allowed_values(runs, demo_manifest, tmp_path):
    with pytest.raises(ValueError, match="key 'dtype' has value 'bfloat16'; allowed: float16, float32"):
        embed_latents(runs["kl"], demo_manifest, tmp_path / "l.zarr", dtype="bfloat16")
    with pytest.raises(ValueError, match="key 'batch_size' has value 0; allowed: integer >= 1"):
        embed_latents(runs["kl"], demo_manifest, tmp_path / "l.zarr", batch_size=0)
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="bad.json: expected a selected.json .* 'checkpoint'"):
        embed_latents(tmp_path / "bad.json", demo_manifest, tmp_path / "l.zarr")
    assert not (tmp_path / "l.zarr").exists()


def test_folder_without_labels_or_masks(runs, demo_manifest, tmp_path):
    # a copy of the images alone: beside the demo's masks/ folder the images folder would give masks
    shutil.copytree(demo_manifest.parent / "images", tmp_path / "photos")
    out = embed_latents(runs["plain"], tmp_path / "photos", tmp_path / "l.zarr", threads=1)
    store = LatentStore(out)
    assert store.masks is None and store.logvar is None and store.classes is None and store.mask_classes is None
    assert (store.labels == -1).all() and store.attrs["manifest"]["sha256"] is None
    batch = LatentDataset(store, "train").__getitems__([0, 1])
    assert set(batch) == {"latent", "index"}


def test_refuses_a_store_made_by_another_autoencoder(runs, stores, demo_manifest, tmp_path):
    store = LatentStore(stores["kl"])
    assert store.check_autoencoder(runs["kl"]) == runs["kl"]
    assert store.check_autoencoder(runs["selected"]) == Path(json.loads(runs["selected"].read_text())["checkpoint"])
    with pytest.raises(LatentError, match=f"{stores['kl']}: made by autoencoder .*tiny_kl_checkpoint_best.pt.* "
                                          "but .*tiny_plain_checkpoint_best.pt has sha256"):
        store.check_autoencoder(runs["plain"])
    loaded = store_autoencoder(store, "cpu")
    model, cfg = loaded.model, loaded.config
    assert isinstance(model, Autoencoder) and cfg.name == "tiny_kl"

    # the recorded checkpoint replaced after embedding: refused; a moved copy of the right one: accepted
    copy = tmp_path / "ae.pt"
    shutil.copy(runs["kl"], copy)
    moved = tmp_path / "moved.pt"
    shutil.copy(runs["kl"], moved)
    made = LatentStore(embed_latents(copy, demo_manifest, tmp_path / "l.zarr", threads=1))
    shutil.copy(runs["plain"], copy)
    with pytest.raises(LatentError, match="made by autoencoder"):
        store_autoencoder(made, "cpu")
    assert store_autoencoder(made, "cpu", checkpoint=moved).config.name == "tiny_kl"


def test_a_failed_write_leaves_the_previous_store_and_no_temporary(runs, demo_manifest, tmp_path, monkeypatch):
    out = embed_latents(runs["kl"], demo_manifest, tmp_path / "l.zarr", batch_size=8, threads=1)
    created = LatentStore(out).attrs["created"]
    calls = {"n": 0}
    encode = Autoencoder.encode

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return encode(self, x)

    monkeypatch.setattr(Autoencoder, "encode", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        embed_latents(runs["kl"], demo_manifest, out, batch_size=8, threads=1)
    assert calls["n"] == 3
    assert LatentStore(out).attrs["created"] == created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.zarr"]


KILL_MID_WAY = """
import os, signal, sys
from ldmflow.models.autoencoder import Autoencoder
from ldmflow.stages.embed import embed_latents
encode, calls = Autoencoder.encode, []
def dying(self, x):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(self, x)
Autoencoder.encode = dying
embed_latents(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=8, threads=1)
"""


def test_kill_9_mid_way_leaves_nothing_that_looks_complete(runs, demo_manifest, tmp_path):
    out = tmp_path / "l.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WAY, str(runs["kl"]), str(demo_manifest), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not out.exists()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".l.zarr.tmp") and (left / "latents").is_dir()
    with pytest.raises(LatentError, match="not a complete ldmflow latent store"):
        LatentStore(left)
    embed_latents(runs["kl"], demo_manifest, out, batch_size=8, threads=1)  # cleans up the dead run's leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["l.zarr"] and LatentStore(out).n == 40


def test_reader_refuses_missing_foreign_and_inconsistent_stores(stores, tmp_path):
    with pytest.raises(FileNotFoundError, match="latent store not found"):
        LatentStore(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3).attrs["format"] = "something-else"
    with pytest.raises(LatentError, match="other.zarr: not a complete ldmflow latent store"):
        LatentStore(tmp_path / "other.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(LatentError, match="empty.zarr: not a zarr v3 group"):
        LatentStore(tmp_path / "empty.zarr")

    broken = tmp_path / "broken.zarr"
    shutil.copytree(stores["kl"], broken)
    zarr.open_group(broken, mode="r+").attrs["latent_channels"] = 5
    with pytest.raises(LatentError, match=r"broken.zarr: array 'latents' has shape \(40, 4, 4, 4\); expected "
                                          r"\(40, 5, 4, 4\)"):
        LatentStore(broken)
    shutil.rmtree(broken)
    shutil.copytree(stores["kl"], broken)
    del zarr.open_group(broken, mode="r+")["logvar"]
    with pytest.raises(LatentError, match="broken.zarr: array 'logvar' is missing"):
        LatentStore(broken)
    shutil.rmtree(broken)
    shutil.copytree(stores["kl"], broken)
    del zarr.open_group(broken, mode="r+").attrs["scale_factor"]
    with pytest.raises(LatentError, match="broken.zarr: attribute.s. scale_factor missing"):
        LatentStore(broken)
    shutil.rmtree(broken)
    shutil.copytree(stores["plain"], broken)
    zarr.open_group(broken, mode="r+").create_array("logvar", shape=(40, 4, 4, 4), dtype="float16")
    with pytest.raises(LatentError, match="broken.zarr: unexpected array.s. logvar for a plain store"):
        LatentStore(broken)


def test_snakemake_timestamp_in_the_store_is_ignored_quietly(stores, tmp_path):
    store = tmp_path / "l.zarr"
    shutil.copytree(stores["kl"], store)
    (store / ".snakemake_timestamp").touch()  # what Snakemake leaves in a directory() output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatentDataset(store, "train", max_gb=0).__getitems__([0])


def test_evaluation_opens_a_workflow_store_without_a_zarr_warning(stores, tmp_path):
    # sample, evaluate and memorization read the store as an image set; zarr warns on any member listing
    from ldmflow.evaluation.image_sets import open_image_set

    store = tmp_path / "l.zarr"
    shutil.copytree(stores["kl"], store)
    (store / ".snakemake_timestamp").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = open_image_set(store)
        LatentStore(store)
    assert len(images) == LatentStore(store).n and images.split is not None


@pytest.mark.parametrize("kl_latents", ["mean", "sample"])
@pytest.mark.parametrize("split", ["train", "val", None])
def test_latent_dataset_in_memory_and_streamed_give_identical_batches(stores, kl_latents, split):
    store = LatentStore(stores["kl"])
    memory = LatentDataset(store, split, kl_latents=kl_latents, masks=True)
    streamed = LatentDataset(store, split, kl_latents=kl_latents, max_gb=0, masks=True)
    assert memory.in_memory and not streamed.in_memory and len(memory) == len(streamed)
    rows = memory.rows
    assert len(rows) == (store.n if split is None else len(store.indices(split)))
    idx = [len(rows) - 1, 0, 2, 0]  # unsorted, with a repeat
    a, b = memory.__getitems__(idx), streamed.__getitems__(idx)
    assert set(a) == set(b) == {"latent", "label", "mask", "index"} | ({"logvar"} if kl_latents == "sample" else set())
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    s = store.scale_factor
    assert a["latent"].dtype == torch.float32 and a["mask"].dtype == torch.uint8 and a["label"].dtype == torch.int64
    expected = torch.from_numpy(store.latents[:][rows[idx]].astype(np.float32)) * s
    assert torch.allclose(a["latent"], expected)
    assert torch.equal(a["label"], torch.from_numpy(store.labels[rows[idx]]))
    assert torch.equal(a["mask"], torch.from_numpy(store.masks[:][rows[idx]]))
    assert torch.equal(a["index"], torch.tensor(idx))
    if kl_latents == "sample":
        # a sample drawn in scaled units has the scaled posterior's std
        raw = store.logvar[:][rows[idx]].astype(np.float64)
        np.testing.assert_allclose(torch.exp(a["logvar"] / 2).numpy(), np.exp(raw / 2) * s, rtol=1e-5)
    one = memory[2]
    assert one["latent"].shape == a["latent"].shape[1:] and int(one["index"]) == 2


def test_latent_dataset_options(stores):
    with pytest.raises(LatentError, match="kl_latents='sample' needs a KL autoencoder's store"):
        LatentDataset(stores["plain"], "train", kl_latents="sample")
    with pytest.raises(ValueError, match="kl_latents 'median'; allowed: 'mean', 'sample'"):
        LatentDataset(stores["kl"], "train", kl_latents="median")
    with pytest.raises(ValueError, match="split 'training'; allowed: train, val, test"):
        LatentDataset(stores["kl"], "training")
    data = LatentDataset(stores["kl"], "train")
    assert torch.equal(data.labels, torch.from_numpy(LatentStore(stores["kl"]).labels[data.rows]))


def test_streamed_dataset_in_a_dataloader_worker(stores):
    dataset = LatentDataset(stores["kl"], "train", max_gb=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[3, 1], [0, 5]], collate_fn=lambda b: b,
                                         num_workers=1)
    batches = list(loader)
    assert torch.equal(batches[1]["latent"], dataset.__getitems__([0, 5])["latent"])


def test_embed_command(runs, demo_manifest, tmp_path):
    out = tmp_path / "l.zarr"
    proc = run_cli("embed", "--checkpoint", str(runs["selected"]), "--data", str(demo_manifest), "--out", str(out),
                   "--set", "batch_size=16", "--set", "dtype=float32", "--threads", "1", "--device", "cpu")
    assert proc.stdout.strip() == str(out)
    store = LatentStore(out)
    assert store.latents.dtype == np.float32 and store.attrs["autoencoder"]["sha256"] == file_sha256(runs["kl"])

    bad = run_cli("embed", "--checkpoint", str(runs["kl"]), "--data", str(demo_manifest), "--out", str(out),
                  "--set", "precision=fp16", check=False)
    assert bad.returncode == 2 and "allowed keys for this command: batch_size, dtype" in bad.stderr
    bad = run_cli("embed", "--checkpoint", str(runs["kl"]), "--data", str(demo_manifest), "--out", str(out),
                  "--set", "dtype=int8", check=False)
    assert bad.returncode == 2 and "key 'dtype' has value 'int8'; allowed: float16, float32" in bad.stderr
    missing = run_cli("embed", "--checkpoint", str(tmp_path / "no.pt"), "--data", str(demo_manifest), "--out",
                      str(out), check=False)
    assert (missing.returncode == 2 and "argument --checkpoint:" in missing.stderr
            and "no.pt' does not exist" in missing.stderr)
    assert LatentStore(out).latents.dtype == np.float32  # the failed runs left the store alone


def test_the_one_streamed_pass_stores_the_same_latents_as_checking_every_row_first(runs, stores, demo_manifest,
                                                                                   tmp_path, monkeypatch):
    # the fixture's store came from the one streamed pass; this one checks every row, then decodes each batch again
    monkeypatch.setattr(embed, "plan_stream", lambda *args: None)
    out = embed_latents(runs["kl"], demo_manifest, tmp_path / "decoded_twice.zarr", batch_size=8, threads=1)
    again, kept = zarr.open_group(out, mode="r"), zarr.open_group(stores["kl"], mode="r")
    for name in ("latents", "logvar", "masks", "labels", "split", "paths"):
        assert np.array_equal(again[name][:], kept[name][:]), name
    made = [{k: v for k, v in LatentStore(s).attrs.items() if k != "created"} for s in (out, stores["kl"])]
    assert made[0] == made[1]  # the same statistics, channels, intensity and provenance


def test_diffusion_batches_read_no_masks_and_a_controlnet_gets_them_as_uint8(stores):
    store = LatentStore(stores["kl"])
    assert store.masks is not None
    for max_gb in (4.0, 0):
        plain = LatentDataset(store, "train", max_gb=max_gb)
        assert "mask" not in plain.__getitems__([0, 1]) and "masks" not in plain.readers
        with_masks = plain.with_masks()
        batch = with_masks.__getitems__([1, 0])
        assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape[1:] == store.masks.shape[1:]
        assert torch.equal(batch["mask"], torch.from_numpy(store.masks[:][plain.rows[[1, 0]]]))
        assert not plain.masks  # with_masks leaves the dataset it came from as it was


def test_latents_are_read_straight_from_their_chunk_files_like_zarr_reads_them(stores):
    from ldmflow.data.latent_store import RowReader

    store = LatentStore(stores["kl"])
    rows = np.array([0, 3, 3, store.n - 1])
    for name in ("latents", "logvar", "masks"):
        reader = RowReader(store.group[name], store.path / name)
        assert (reader.files is not None) == (name != "masks")  # latents uncompressed; masks through zarr
        assert np.array_equal(reader.read(rows), store.group[name][:][rows]), name


def test_streamed_dataset_in_two_forked_workers_after_the_parent_read(stores):
    # zarr v3: a worker forked after its parent read can hang on the parent's I/O loop; readers open per process
    dataset = LatentDataset(stores["kl"], "train", max_gb=0, masks=True)
    first = dataset.__getitems__([0, 5])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[3, 1], [0, 5], [2, 4], [5, 0]],
                                         collate_fn=lambda b: b, num_workers=2, multiprocessing_context="fork",
                                         timeout=60)
    batches = list(loader)
    for key in ("latent", "mask"):
        assert torch.equal(batches[1][key], first[key]) and torch.equal(batches[3][key], first[key].flip(0))


def _longer_manifest(demo_manifest: Path, folder: Path, copies: int) -> Path:
    """The demo's rows ``copies`` times over (absolute paths, so the manifest may live elsewhere)."""
    lines = demo_manifest.read_text().splitlines()
    root = demo_manifest.parent
    rows = [",".join([str(root / image), str(root / mask), label]) for image, mask, label in
            (line.split(",") for line in lines[1:])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text("\n".join([lines[0]] + rows * copies) + "\n")
    return folder / "manifest.csv"


def _count_decoded(monkeypatch) -> dict:
    """Count decoded images alive at once (each decoded row's pixels, and each batch's rows until the batch is
    freed) and which manifest rows were decoded."""
    import threading
    import weakref

    from ldmflow.data import dataset, images

    seen: dict = {"live": 0, "peak": 0, "rows": []}
    lock = threading.Lock()

    def add(k: int) -> None:
        with lock:
            seen["live"] += k
            seen["peak"] = max(seen["peak"], seen["live"])

    def counted_row(*args, **kwargs):
        row = decode_row(*args, **kwargs)
        add(1)
        seen["rows"].append(args[5])
        weakref.finalize(row.image, add, -1)
        return row

    def counted_batch(check, rows):
        batch = decode_checked(check, rows)
        add(len(rows))
        weakref.finalize(batch["image"], add, -len(rows))
        return batch

    decode_row, decode_checked = images.decode_row, dataset.decode_checked
    for module in (images, dataset):  # load_row, and the stream's own decoding
        monkeypatch.setattr(module, "decode_row", counted_row)
    monkeypatch.setattr(embed, "decode_checked", counted_batch)
    return seen


@pytest.mark.parametrize("copies", [1, 4])
def test_embedding_decodes_each_image_once_and_holds_a_few_batches_however_long_the_manifest(
        copies, runs, demo_manifest, tmp_path, monkeypatch):
    manifest = _longer_manifest(demo_manifest, tmp_path / "data", copies)
    seen = _count_decoded(monkeypatch)
    batch_size = 2
    store = LatentStore(embed_latents(runs["kl"], manifest, tmp_path / "l.zarr", batch_size=batch_size, threads=1))
    assert store.n == 40 * copies
    assert sorted(seen["rows"]) == list(range(1, store.n + 1))  # no pass before the encoding pass
    workers, _ = embed.decoding_threads(torch.device("cpu"))  # with the one torch thread embed_latents set
    # 2 x workers batches ahead, the batch encoded and the one before it, each worker's rows before stacking
    assert seen["peak"] <= (3 * workers + 2) * batch_size < store.n


def test_a_bad_image_mid_way_names_its_row_and_file_and_leaves_no_store(runs, demo_manifest, tmp_path):
    manifest = _longer_manifest(demo_manifest, tmp_path / "data", 1)
    bad = tmp_path / "data" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines = manifest.read_text().splitlines()
    lines[30] = ",".join([str(bad)] + lines[30].split(",")[1:])
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"row 30: cannot read image {bad}"):
        embed_latents(runs["kl"], manifest, tmp_path / "l.zarr", batch_size=4, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_rows_skipped_by_the_config_leave_a_store_without_them_and_name_them(runs, demo_manifest, tmp_path):
    state = load_checkpoint(runs["kl"])
    state["config"]["data"]["skip_bad_rows"] = True
    skipping = tmp_path / "skipping.pt"
    save_checkpoint(state, skipping)
    manifest = _longer_manifest(demo_manifest, tmp_path / "data", 1)
    lines = manifest.read_text().splitlines()
    lines[30] = ",".join([str(tmp_path / "missing.png")] + lines[30].split(",")[1:])
    manifest.write_text("\n".join(lines) + "\n")
    store = LatentStore(embed_latents(skipping, manifest, tmp_path / "out" / "l.zarr", batch_size=4, threads=1))
    assert store.n == 39 and str(tmp_path / "missing.png") not in list(store.paths)
    skipped = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert skipped["count"] == 1 and skipped["rows"][0]["row"] == 30


@pytest.mark.parametrize("overlap", [True, False])
def test_prefetch_gives_every_batch_in_order_and_without_overlap_never_decodes_while_the_caller_encodes(overlap):
    import threading
    import time

    encoding, clashes = threading.Event(), []

    def load(rows):
        time.sleep(0.002)
        if encoding.is_set():
            clashes.append(rows)
        return list(rows)

    got = []
    for batch in embed.Prefetch(load, (range(i, i + 3) for i in range(0, 30, 3)), workers=2, overlap=overlap):
        encoding.set()
        got.append(batch)
        time.sleep(0.004)
        encoding.clear()
    assert got == [list(range(i, i + 3)) for i in range(0, 30, 3)]
    if not overlap:
        assert clashes == []


def test_latents_written_straight_to_many_chunk_files_read_back_as_zarr_and_rows_read_them(runs, stores, demo_manifest,
                                                                                          tmp_path, monkeypatch):
    row_bytes = 4 * 4 * 4 * 2  # (C, h, w) float16 latents of the tiny autoencoder
    monkeypatch.setattr(embed, "RAW_CHUNK_BYTES", 7 * row_bytes)  # 40 rows: 6 chunks, the last one padded
    out = embed_latents(runs["kl"], demo_manifest, tmp_path / "chunked.zarr", batch_size=8, threads=1)
    chunked, whole = zarr.open_group(out, mode="r"), zarr.open_group(stores["kl"], mode="r")
    assert chunked["latents"].chunks[0] == 7 and whole["latents"].chunks[0] == 40
    for name in ("latents", "logvar"):
        assert np.array_equal(chunked[name][:], whole[name][:]), name
    rows = LatentDataset(out, split=None, max_gb=0.0).__getitems__([39, 0, 13])["latent"]
    assert torch.equal(rows, LatentDataset(stores["kl"], split=None, max_gb=0.0).__getitems__([39, 0, 13])["latent"])
