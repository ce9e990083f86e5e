import json

import pytest
import torch

from ldmflow.errors import SelectionError
from ldmflow.stages.select_autoencoder import select_autoencoder


def fake_run(root, name, values, psnr):
    (root / name / "checkpoints").mkdir(parents=True)
    torch.save({}, root / name / "checkpoints" / f"{name}_checkpoint_best.pt")
    lines = ["epoch,val_loss,val_psnr"] + [f"{i + 1},{v},{p}" for i, (v, p) in enumerate(zip(values, psnr))]
    (root / name / f"{name}_metrics.csv").write_text("\n".join(lines) + "\n")
    return root / name


def test_picks_lowest_and_highest(tmp_path):
    runs = [fake_run(tmp_path, "a", [0.5, 0.3, 0.4], [10, 14, 13]), fake_run(tmp_path, "b", [0.6, 0.35], [11, 18])]
    result = select_autoencoder(runs, tmp_path / "sel" / "selected.json")
    assert result["name"] == "a" and result["value"] == 0.3 and result["candidates"][0]["epoch"] == 2
    on_disk = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert on_disk["checkpoint"].endswith("a_checkpoint_best.pt") and len(on_disk["candidates"]) == 2
    assert (tmp_path / "sel" / "validation_curves.png").stat().st_size > 1000
    assert select_autoencoder(runs, tmp_path / "s2.json", metric="val_psnr", mode="max", plot=False)["name"] == "b"


def test_unknown_metric_and_missing_run(tmp_path):
    run = fake_run(tmp_path, "a", [0.5], [10])
    with pytest.raises(SelectionError, match="'val_miuo' is not a metrics column; allowed: val_loss, val_psnr"):
        select_autoencoder([run], tmp_path / "s.json", metric="val_miuo")
    with pytest.raises(SelectionError, match="expected one NAME_metrics.csv"):
        select_autoencoder([tmp_path / "nothing"], tmp_path / "s.json")
