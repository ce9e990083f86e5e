import copy
import json

import pytest
import yaml

from ldmflow.artifacts import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ldmflow.errors import SelectionError
from ldmflow.stages.select_autoencoder import select_autoencoder
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.workflow import selection_warnings

from .conftest import TINY_AE


def fake_run(root, name, values, psnr, kept_by="val_loss"):
    """A run folder as training leaves it: a metrics CSV, and a best checkpoint that records its best epoch
    (the best ``kept_by`` value, lower is better for val_loss, higher for val_psnr) in its own history."""
    history = [{"epoch": i + 1, "val_loss": v, "val_psnr": float(p)} for i, (v, p) in enumerate(zip(values, psnr))]
    pick = min if kept_by == "val_loss" else max
    best = pick(history, key=lambda r: r[kept_by])
    save_checkpoint({"format": CHECKPOINT_FORMAT, "stage": "autoencoder", "name": name, "history": history,
                     "best_epoch": best["epoch"], "best": best[kept_by],
                     "config": {"train": {"early_stopping": {"metric": kept_by}}}},
                    root / name / "checkpoints" / f"{name}_checkpoint_best.pt")
    lines = ["epoch,val_loss,val_psnr"] + [f"{r['epoch']},{r['val_loss']},{r['val_psnr']}" for r in history]
    (root / name / f"{name}_metrics.csv").write_text("\n".join(lines) + "\n")
    return root / name


def test_picks_lowest_and_highest(tmp_path):
    runs = [fake_run(tmp_path, "a", [0.5, 0.3, 0.4], [10, 14, 13]), fake_run(tmp_path, "b", [0.6, 0.35], [11, 18])]
    result = select_autoencoder(runs, tmp_path / "sel" / "selected.json")
    assert result["name"] == "a" and result["value"] == 0.3 and result["epoch"] == 2
    on_disk = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert on_disk["checkpoint"].endswith("a_checkpoint_best.pt") and len(on_disk["candidates"]) == 2
    assert (tmp_path / "sel" / "validation_curves.png").stat().st_size > 1000
    assert select_autoencoder(runs, tmp_path / "s2.json", metric="val_psnr", mode="max", plot=False)["name"] == "b"


def test_ranks_each_run_at_its_checkpoints_epoch_not_its_best_epoch(tmp_path):
    # run a reaches val_psnr 30 at epoch 3, but its checkpoint (kept by val_loss) is epoch 1's, at psnr 12
    a = fake_run(tmp_path, "a", [0.2, 0.5, 0.6], [12, 20, 30])
    b = fake_run(tmp_path, "b", [0.4, 0.3], [11, 15])
    result = select_autoencoder([a, b], tmp_path / "s.json", metric="val_psnr", mode="max", plot=False)
    assert (result["name"], result["epoch"], result["value"], result["kept_by"]) == ("b", 2, 15.0, "val_loss")
    assert [(c["name"], c["epoch"], c["value"]) for c in result["candidates"]] == [("a", 1, 12.0), ("b", 2, 15.0)]


def test_unknown_metric_and_missing_run(tmp_path):
    run = fake_run(tmp_path, "a", [0.5], [10])
    with pytest.raises(SelectionError, match="'val_miuo' is not a metrics column; allowed: val_loss, val_psnr"):
        select_autoencoder([run], tmp_path / "s.json", metric="val_miuo")
    with pytest.raises(SelectionError, match="expected one NAME_metrics.csv"):
        select_autoencoder([tmp_path / "nothing"], tmp_path / "s.json")


def test_selected_json_describes_the_checkpoint_it_names(tmp_path, demo_manifest):
    """On real tiny runs kept by val_loss and ranked on val_rgb: selected.json's epoch and value are those of
    the named checkpoint's own record."""
    runs = []
    for name, lr in (("fast", 3e-3), ("slow", 1e-3)):
        cfg = copy.deepcopy(TINY_AE) | {"name": name}
        cfg["optim"]["lr"], cfg["train"]["epochs"] = lr, 3
        train_autoencoder(cfg, demo_manifest, tmp_path / name, progress=False)
        runs.append(tmp_path / name)
    selected = select_autoencoder(runs, tmp_path / "selected.json", metric="val_rgb", plot=False)
    assert json.loads((tmp_path / "selected.json").read_text()) == selected
    for entry in [selected, *selected["candidates"]]:
        ckpt = load_checkpoint(entry["checkpoint"])
        row = next(r for r in ckpt["history"] if r["epoch"] == ckpt["best_epoch"])
        assert entry["epoch"] == ckpt["best_epoch"] and entry["value"] == pytest.approx(row["val_rgb"])
    assert selected["value"] == min(c["value"] for c in selected["candidates"])


def test_plan_time_warning_when_selection_and_checkpointing_metrics_differ(tmp_path):
    paths = {}
    for name, metric in (("a", "val_loss"), ("b", "val_rgb")):
        paths[name] = tmp_path / f"{name}.yaml"
        experiment = TINY_AE | {"name": name, "train": {"early_stopping": {"metric": metric}}}
        paths[name].write_text(yaml.safe_dump(experiment))
    messages = selection_warnings({k: str(v) for k, v in paths.items()}, {"metric": "val_rgb", "mode": "min"})
    assert (len(messages) == 1 and "a.yaml" in messages[0]
            and "kept by train.early_stopping.metric=val_loss" in messages[0])
