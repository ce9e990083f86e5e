import json

import pandas as pd
import yaml

from .conftest import TINY_AE, run_cli


def test_demo_data_train_select_from_the_command_line(tmp_path):
    run_cli("demo-data", "--out", str(tmp_path / "d"), "--n", "20", "--set", "size=16")
    assert len(pd.read_csv(tmp_path / "d/manifest.csv")) == 20
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump(TINY_AE))
    out = run_cli("train-ae", "--config", str(config), "--data", str(tmp_path / "d/manifest.csv"), "--out",
                  str(tmp_path / "run"), "--set", "train.epochs=1", "--set", "model.variant=plain")
    assert "best val_loss" in out.stdout
    assert len(pd.read_csv(tmp_path / "run/tiny_metrics.csv")) == 1
    run_cli("select-ae", "--runs", str(tmp_path / "run"), "--out", str(tmp_path / "selected.json"),
            "--set", "metric=val_psnr", "--set", "mode=max")
    assert json.loads((tmp_path / "selected.json").read_text())["name"] == "tiny"


def test_bad_config_exits_2_naming_file_and_key(tmp_path):
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump({**TINY_AE, "modle": {}}))
    proc = run_cli("train-ae", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                   check=False)
    assert proc.returncode == 2
    assert f"{config}: unknown key 'modle'" in proc.stderr and "allowed keys" in proc.stderr


def test_bad_set_key_for_a_plain_command(tmp_path):
    proc = run_cli("demo-data", "--out", str(tmp_path), "--set", "colour=red", check=False)
    assert proc.returncode == 2 and "allowed keys for this command: n, size, seed" in proc.stderr
