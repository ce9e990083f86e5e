"""The judge: trained on real demo images only, it reads real val images far better than noise, gives chance-level
class fidelity to samples whose labels are shuffled, trains the same twice, and keeps its heads to the data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmflow.artifacts import load_checkpoint, save_checkpoint
from ldmflow.checkpoints import load_judge
from ldmflow.config.judge import AugmentConfig, judge_config
from ldmflow.errors import ConfigError, DataError
from ldmflow.evaluation.judge import (
    DecodedLatents,
    ImageFiles,
    augment,
    judge_outputs,
    meets,
    members,
    read_images,
    save_judge,
    spread,
    train_judge,
    validity,
)
from ldmflow.evaluation.metrics import segmentation_scores
from ldmflow.evaluation.two_sample import two_sample_test, wilson_interval
from ldmflow.models.judge import Judge
from ldmflow.stages.evaluate import class_fidelity

FAST = {"epochs": 30, "eval_every": 30, "members": 1}  # the demo recipe, half its epochs, one judge


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ldmflow.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("judge") / "data", n=256, size=32, seed=7)


@pytest.fixture(scope="module")
def trained(demo):
    model, record = train_judge(demo, judge_config(FAST), image_size=32, threads=1)
    from ldmflow.evaluation.judge import real_images

    return model, record, real_images(demo, 1, 32)


def test_the_judge_reads_real_val_images_far_above_noise(trained):
    model, record, real = trained
    val = real.indices("val")
    v = record["real_val"]
    assert v["n"] == len(val) and set(v["per_class_accuracy"]) == {"circle", "square", "triangle"}
    noise = torch.rand(real.images[val].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    on_noise = validity(model, noise, real.labels[val], real.masks[val], real.mask_classes, real.classes)
    print(f"real val: accuracy {v['accuracy']:.2f}, mIoU {v['miou']:.2f}; noise: balanced accuracy "
          f"{on_noise['balanced_accuracy']:.2f}, mIoU {on_noise['miou']:.2f}")
    assert v["balanced_accuracy"] > on_noise["balanced_accuracy"] + 0.25
    assert v["miou"] > on_noise["miou"] + 0.25 and v["miou"] > 0.45
    assert record["curve"][-1]["epoch"] == FAST["epochs"]


def test_shuffled_labels_score_near_chance_and_true_labels_do_not(trained):
    model, _, real = trained
    rows = np.flatnonzero(real.labels.numpy() >= 0)
    probs = judge_outputs(model, real.images[rows])["probs"]
    truth = real.labels[rows]
    shuffled = truth[torch.randperm(len(truth), generator=torch.Generator().manual_seed(1))]
    right, wrong = class_fidelity(model, probs, truth), class_fidelity(model, probs, shuffled)
    print(f"class fidelity: true labels {right['accuracy']:.2f}, shuffled {wrong['accuracy']:.2f} "
          f"(chance {wrong['chance']:.2f})")
    assert right["accuracy"] > 0.8
    assert abs(wrong["accuracy"] - wrong["chance"]) < 0.12  # chance: sum of squared class frequencies
    assert wrong["accuracy_ci95"][0] <= wrong["chance"] <= wrong["accuracy_ci95"][1] + 0.05
    assert sum(map(sum, right["confusion"]["counts"])) == len(rows)


def test_unconditional_samples_and_label_free_judges_say_why_there_is_no_class_fidelity(trained):
    model, _, real = trained
    probs = judge_outputs(model, real.images[:4])["probs"]
    assert "unconditional" in class_fidelity(model, probs, None)["reason"]
    assert class_fidelity(model, None, real.labels[:4])["reason"] == "not available: no labels (the judge has no " \
        "class head)"


def test_the_two_sample_test_is_chance_for_one_distribution_and_perfect_for_two():
    rng = np.random.default_rng(0)
    same = two_sample_test(rng.normal(size=(60, 8)), rng.normal(size=(80, 8)))
    apart = two_sample_test(rng.normal(size=(60, 8)), rng.normal(2.0, 1.0, size=(60, 8)))
    assert same["n_per_set"] == 60 and same["accuracy_ci95"][0] < 0.5 < same["accuracy_ci95"][1]
    assert apart["accuracy"] > 0.97
    assert not two_sample_test(rng.normal(size=(3, 8)), rng.normal(size=(9, 8)))["available"]


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None


def test_same_seed_same_judge_and_the_checkpoint_rebuilds_it(demo, tmp_path):
    cfg = judge_config(epochs=1, width=4, levels=2)
    a, rec = train_judge(demo, cfg, image_size=16, threads=1)
    b, _ = train_judge(demo, cfg, image_size=16, threads=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    save_judge(a, rec, tmp_path / "judge.pt")
    c = load_judge(tmp_path / "judge.pt").model
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(judge_outputs(a, x)["probs"], judge_outputs(c, x)["probs"])
    assert c.validity["real_val"] == rec["real_val"] and c.info["classes"] == ["circle", "square", "triangle"]
    # a larger image is resized to the judge's size, its segmentation returned at the image's own size
    assert judge_outputs(c, torch.zeros(2, 3, 32, 32))["seg"].shape == (2, 32, 32)


def test_the_ensemble_trains_one_judge_per_seed_and_its_checkpoint_rebuilds_every_member(demo, tmp_path):
    cfg = judge_config(epochs=1, width=4, levels=2, members=3)
    model, record = train_judge(demo, cfg, image_size=16, threads=1)
    judges = members(model)
    assert len(judges) == 3 and judges[0] is model and [m["seed"] for m in record["members"]] == [42, 43, 44]
    assert not torch.equal(judges[0].stem[0].weight, judges[1].stem[0].weight)  # seeds differ, so do the judges
    accuracy = record["ensemble"]["accuracy"]
    assert accuracy["min"] <= accuracy["median"] <= accuracy["max"] and len(accuracy["members"]) == 3
    save_judge(model, record, tmp_path / "judge.pt")
    loaded = load_judge(tmp_path / "judge.pt")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert loaded.config.members == 3 and len(members(loaded.model)) == 3
    for trained, rebuilt, r in zip(judges, members(loaded.model), record["members"]):
        assert torch.equal(judge_outputs(trained, x)["probs"], judge_outputs(rebuilt, x)["probs"])
        assert rebuilt.validity["real_val"] == r["real_val"]


def test_a_judge_file_from_before_ensembles_loads_as_a_one_judge_ensemble(demo, tmp_path):
    model, record = train_judge(demo, judge_config(epochs=1, width=4, levels=2, members=1), image_size=16, threads=1)
    save_judge(model, record, tmp_path / "judge.pt")
    state = load_checkpoint(tmp_path / "judge.pt")
    del state["members"]  # what a judge.pt of the previous release holds
    state["config"].pop("members")
    save_checkpoint(state, tmp_path / "old.pt")
    old = load_judge(tmp_path / "old.pt")
    assert members(old.model) == [old.model] and old.config.members == 1
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(judge_outputs(model, x)["probs"], judge_outputs(old.model, x)["probs"])


def test_an_ensemble_score_meets_a_target_only_when_its_weakest_judge_does():
    scores = spread([0.95, 0.80, 0.90, None])
    assert scores["median"] == 0.90 and (scores["min"], scores["max"]) == (0.80, 0.95) and scores["n"] == 3
    assert meets(scores, 0.80) and not meets(scores, 0.85)  # the median (0.90) alone would pass 0.85
    assert spread([None]) is None and not meets(None, 0.0)


def test_augmentation_moves_image_and_mask_together():
    masks = torch.randint(0, 4, (6, 16, 16), generator=torch.Generator().manual_seed(0))
    images = (masks[:, None].float() / 3 * 2 - 1).repeat(1, 3, 1, 1)  # every pixel's value names its class
    cfg = AugmentConfig(hflip=True, vflip=True, shift=3, jitter=0.0, noise=0.0, blur=0.0)
    x, m = augment(images, masks, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(((x[:, 0] + 1) / 2 * 3).round().long(), m) and not torch.equal(m, masks)
    noisy, _ = augment(images, masks, AugmentConfig(), torch.Generator().manual_seed(1))
    assert noisy.min() >= -1 and noisy.max() <= 1 and not torch.equal(noisy, images)


def _rewrite(manifest, out, columns):
    rows = list(csv.DictReader(manifest.open()))
    out.write_text(",".join(columns) + "\n" + "".join(
        ",".join(str(manifest.parent / r[c]) if c in ("image", "mask") else r[c] for c in columns) + "\n"
        for r in rows))
    return out


@pytest.mark.parametrize("columns", [("image", "mask"), ("image", "label")])
def test_a_judge_has_only_the_heads_its_data_allow(demo, tmp_path, columns):
    model, record = train_judge(_rewrite(demo, tmp_path / "m.csv", columns), judge_config(epochs=1, width=4),
                                image_size=16, threads=1)
    assert ((model.classifier is not None) == ("label" in columns)
            and (model.segmenter is not None) == ("mask" in columns))
    assert ("accuracy" in record["real_val"]) == ("label" in columns)
    assert ("miou" in record["real_val"]) == ("mask" in columns)


def test_sixteen_bit_grayscale_files_reach_the_judge_in_the_unit_range(tmp_path):
    values = np.linspace(1000, 5000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "a.png")
    x = read_images([str(tmp_path / "a.png")], 8, 1, [[1000.0, 5000.0]], "test")
    assert x.shape == (1, 1, 8, 8) and x.min() == -1 and x.max() == 1


def test_bad_judge_options_name_the_key():
    with pytest.raises(ConfigError, match="epochs"):
        judge_config(epochs=0)
    with pytest.raises(ConfigError, match="augment"):
        judge_config(augment={"flip": True})


def _png_files(folder, n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return [str(folder / f"{i:05d}.png") for i in range(n)]


def test_image_files_read_a_batch_at_a_time_score_exactly_as_files_read_at_once(tmp_path):
    paths = _png_files(tmp_path / "png", 70, size=24)
    torch.manual_seed(0)
    model = Judge(3, 3, 4, width=4, image_size=16, flips=(-1,))
    at_once = read_images(paths, 24, 3, None, "test")
    files = ImageFiles(paths, 24, 3, None, "test", threads=2)
    assert len(files) == 70 and torch.equal(files[10:37], at_once[10:37])
    whole = judge_outputs(model, at_once, batch_size=16)
    for key, value in judge_outputs(model, files, batch_size=16).items():
        assert torch.equal(value, whole[key]), key
    labels = torch.arange(70) % 4 - 1  # -1: unlabelled rows
    masks = torch.randint(0, 4, (70, 24, 24), generator=torch.Generator().manual_seed(1))
    whole = judge_outputs(model, at_once)  # validity's batches
    assert validity(model, files, labels, masks, 4, ["a", "b", "c"]) == {
        "n": 70, **_scores_from(whole, labels, masks)}


def _scores_from(whole, labels, masks):
    """validity's figures computed the plain way, from every image's outputs at once."""
    known = labels >= 0
    pred, truth = whole["probs"].argmax(1)[known], labels[known]
    per_class = {c: float((pred[truth == k] == k).float().mean()) for k, c in enumerate("abc")}
    correct = int((pred == truth).sum())
    return {"accuracy": correct / len(truth), "accuracy_ci95": wilson_interval(correct, len(truth)),
            "balanced_accuracy": float(np.mean(list(per_class.values()))), "per_class_accuracy": per_class,
            "labelled": len(truth), **segmentation_scores(whole["seg"], masks, 4)}


def test_deep_files_without_a_range_are_scaled_by_the_whole_sets_range_and_mixed_depths_stop(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(1000 * i, 1000 * i + 900, (8, 8), dtype=np.uint16)).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(9)]
    files = ImageFiles(paths, 8, 1, None, "test")
    assert torch.equal(torch.cat([files[0:4], files[4:9]]), read_images(paths, 8, 1, None, "test"))
    _png_files(tmp_path / "png", 1, size=8)
    mixed = ImageFiles(paths + [str(tmp_path / "png" / "00000.png")], 8, 1, None, "test")
    mixed[0:9]
    with pytest.raises(DataError, match="8-bit and deeper"):
        mixed[9:10]


MEMORY_PROBE = """
import re, sys, torch
from ldmflow.evaluation.judge import ImageFiles, judge_outputs
from ldmflow.models.judge import Judge

def peak_mib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

paths = sys.argv[1:]
torch.manual_seed(0)
model = Judge(3, 3, 4, width=4, image_size=16)
def areas(seg, rows):
    return torch.nn.functional.one_hot(seg, 4).sum((1, 2))
peaks = []
for n in (len(paths) // 8, len(paths)):
    out = judge_outputs(model, ImageFiles(paths[:n], 64, 3, None, "probe", threads=2), seg=areas)
    assert out["seg"].shape == (n, 4) and out["probs"].shape == (n, 3)
    peaks.append(peak_mib())
print(peaks[0], peaks[1])
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident memory from /proc")
def test_scoring_many_image_files_needs_no_more_memory_than_scoring_a_few(tmp_path):
    # 2,400 images of 64 px: 113 MiB as float32, 75 MiB more as (N, H, W) class ids; a batch of 128 is 6 MiB.
    # A fixed mmap threshold stops glibc moving large buffers onto its heap, whose fragmentation would add tens
    # of MiB of noise: the peak then counts what scoring holds.
    paths = _png_files(tmp_path / "png", 2400)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *paths], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    few, many = map(float, proc.stdout.split())
    print(f"peak memory scoring 300 images: {few:.0f} MiB, 2,400: {many:.0f} MiB")
    assert many - few < 30, f"peak memory {few:.0f} MiB scoring 300 images, {many:.0f} MiB scoring 2,400"


class _BatchSizeDecoder(torch.nn.Module):
    """Decodes z to z / 100 + the size of the batch it came in: shows which batch decoded each image."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def decode(self, z):
        return z / 100 + len(z) / 100, None


def test_latents_decoded_a_slice_at_a_time_come_out_as_from_one_pass_in_chunks():
    latents = torch.rand(150, 1, 2, 2)
    decoded = DecodedLatents(latents.numpy(), _BatchSizeDecoder(), chunk=64)
    one_pass = torch.cat([latents[i:i + 64] / 100 + len(latents[i:i + 64]) / 100 for i in range(0, 150, 64)])
    assert len(decoded) == 150
    for part in (slice(0, 16), slice(60, 70), slice(128, 150), slice(0, 150)):
        assert torch.equal(decoded[part], one_pass[part].clamp(-1, 1)), part
