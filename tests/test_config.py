import argparse
import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml

from ldmflow.cli.arguments import _apply_sets
from ldmflow.config.autoencoder import AutoencoderExperiment, AutoencoderModelConfig
from ldmflow.config.loading import STAGES, load_config, schema_documents, schema_tables
from ldmflow.config.schema import to_dict
from ldmflow.config.yamlio import load_yaml
from ldmflow.errors import ConfigError
from ldmflow.workflow import workflow_config

from .conftest import REPO


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_fill_a_minimal_file(tmp_path):
    cfg = load_config(write(tmp_path, {"name": "a"}))
    assert isinstance(cfg, AutoencoderExperiment)
    assert cfg.seed == 42 and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.01 and cfg.data.batch_size == 16
    assert cfg.model.channel_mult == [1, 2, 2]


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = write(tmp_path, {"name": "a", "optim": {"lr": 1e-3, "learning_rate": 2}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'data.batch_size' has value 'big'; allowed: integer >= 1"):
        load_config(write(tmp_path, {"name": "a", "data": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match=r"key 'optim.lr' has value -1.*> 0"):
        load_config(write(tmp_path, {"name": "a", "optim": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"key 'model.downsample' has value 3; allowed: one of 4, 8"):
        load_config(write(tmp_path, {"name": "a", "model": {"downsample": 3}}))


def test_cross_field_check_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'model.channel_mult'.*4 positive integers"):
        load_config(write(tmp_path, {"name": "a", "model": {"downsample": 8, "channel_mult": [1, 2, 2]}}))


def test_missing_file_and_required_name(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="'name' is a required property"):
        load_config(write(tmp_path, {"seed": 1}))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, {"name": "a"})
    cfg = load_config(path, overrides=["train.epochs=3", "model.variant=plain", "optim.grad_clip=null"])
    assert cfg.train.epochs == 3 and cfg.model.variant == "plain" and cfg.optim.grad_clip is None
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path, overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, overrides=["train.epochs"])


@pytest.mark.parametrize("variant", typing.get_args(typing.get_type_hints(AutoencoderModelConfig)["variant"]))
@pytest.mark.parametrize("downsample", typing.get_args(typing.get_type_hints(AutoencoderModelConfig)["downsample"]))
def test_every_model_option_validates(variant, downsample):
    cfg = load_config({"name": "a", "model": {"variant": variant, "downsample": downsample}})
    assert cfg.model.variant == variant and len(cfg.model.channel_mult) == {4: 3, 8: 4}[downsample]


def test_resolved_config_round_trips():
    cfg = load_config({"name": "a", "model": {"downsample": 8}})
    assert load_config(to_dict(cfg)) == cfg


def test_committed_schemas_match_the_dataclasses():
    for name, text in schema_documents().items():
        path = REPO / "config" / "schemas" / name
        assert path.read_text() == text, f"{path} is stale: run `ldmflow schemas`"
    assert set(STAGES) <= {n.split(".")[0] for n in schema_documents()}


def test_committed_schema_tables_are_what_ldmflow_schemas_writes_and_list_every_key():
    import json

    for name, text in schema_tables().items():
        path = REPO / "config" / "schemas" / name
        assert path.read_text() == text, f"{path} is stale: run `ldmflow schemas`"
    table = schema_tables()["diffusion.schema.md"]
    assert "| `optim.lr` | number | `0.0001` | > 0 | Peak learning rate of AdamW. |" in table
    assert "| `diffusion.schedule` | string | `\"scaled_linear\"` | `linear`, `scaled_linear`, `cosine` |" in table
    for name, text in schema_documents().items():  # every key of the JSON schema has its row
        rows = schema_tables()[name.removesuffix(".json") + ".md"]
        stack = [("", json.loads(text))]
        while stack:
            prefix, node = stack.pop()
            for key, sub in node.get("properties", {}).items():
                assert f"| `{prefix}{key}` |" in rows, (name, prefix + key)
                stack.append((f"{prefix}{key}.", sub))


STAGE_DIRS = {"autoencoders": "autoencoder", "diffusion": "diffusion", "controlnet": "controlnet"}
EXPERIMENT_FILES = sorted(p for p in (REPO / "config").rglob("*.yaml") if p.parent.name in STAGE_DIRS)


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_experiment_files_validate(path):
    load_config(path, STAGE_DIRS[path.parent.name])


# --------------------------------------------------------------------------------------------------
# Numbers as users write them (ldmflow.config.yamlio), in every place ldmflow reads YAML
# --------------------------------------------------------------------------------------------------

SPELLINGS = {"1e-4": 1e-4, "5E-3": 5e-3, ".5": 0.5, "1.0e+3": 1000.0, "-2e-5": -2e-5, "1e5": 1e5, "-.5": -0.5,
             "1.5e-4": 1.5e-4, "0.01": 0.01, "3": 3, "1_000": 1000}


@pytest.mark.parametrize("text", SPELLINGS)
def test_a_number_reads_as_a_number_however_it_is_spelled_and_a_quoted_one_stays_a_string(text):
    value = load_yaml(f"x: {text}")["x"]
    assert value == SPELLINGS[text] and type(value) is type(SPELLINGS[text])
    assert load_yaml(f'x: "{text}"')["x"] == text and load_yaml(f"x: '{text}'")["x"] == text


def test_lr_1e_4_in_an_experiment_file_is_a_learning_rate(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: a\noptim:\n  lr: 1e-4\n  weight_decay: 5E-3\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 5e-3)
    path.write_text('name: a\noptim:\n  lr: "1e-4"\n')  # quoted: the string it says it is
    with pytest.raises(ConfigError, match=r"key 'optim.lr' has value '1e-4'; allowed: number > 0"):
        load_config(path)


def test_set_overrides_read_numbers_as_written(tmp_path):
    path = write(tmp_path, {"name": "a"})
    cfg = load_config(path, overrides=["optim.lr=5e-4", "optim.weight_decay=1E-2"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, 1e-2)
    args = argparse.Namespace(set=["calibration_rate=5e-3"])  # a command without a config file
    _apply_sets(args, ("calibration_rate",), {})
    assert args.calibration_rate == 5e-3


def test_the_workflow_config_reads_numbers_and_merges_as_snakemake_does(tmp_path):
    main, extra = tmp_path / "config.yaml", tmp_path / "preset.yaml"
    main.write_text("memorization: {calibration_rate: 1e-2, feature: pixel}\nsampling: {n: 8, seed: 1}\n"
                    "phases: {p: [autoencoder/*]}\nname: '1e-4'\n")
    extra.write_text("memorization: {calibration_rate: 5e-3}\nphases: {q: [diffusion/*]}\n"
                     "autoencoders: [{grid: {base: a.yaml, axes: {optim.lr: [1e-4, 5E-3]}}}]\n")
    config = workflow_config(main, [extra], {"sampling": {"n": 16}})
    assert config["memorization"] == {"calibration_rate": 5e-3, "feature": "pixel"}  # a mapping merges key by key
    assert config["sampling"] == {"n": 16, "seed": 1} and config["name"] == "1e-4"  # quoted: a string
    assert config["phases"] == {"p": ["autoencoder/*"], "q": ["diffusion/*"]}
    assert config["autoencoders"][0]["grid"]["axes"]["optim.lr"] == [1e-4, 5e-3]
    assert "sampling" not in workflow_config(main, [extra], replace=True)  # --replace-workflow-config
    assert workflow_config(tmp_path / "missing.yaml", [extra])["memorization"] == {"calibration_rate": 5e-3}


def test_every_yaml_read_in_the_package_goes_through_the_one_loader():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "src").rglob("*.py"))
                 if p.name != "yamlio.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "yaml.safe_load" in line
                 or "yaml.load(" in line]
    assert offenders == [], "read YAML with ldmflow.config.yamlio.load_yaml, which reads 1e-4 as a number"


# --------------------------------------------------------------------------------------------------
# The workflow config's schema (config/schemas/config.schema.yaml) against what the workflow reads
# --------------------------------------------------------------------------------------------------

WORKFLOW_CODE = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk")), REPO / "src/ldmflow/workflow.py",
                 REPO / "src/ldmflow/config/judge.py"]
# config["a"]["b"], config["a"].get("b"), config.get("a"): the key paths the workflow reads
CONFIG_READ = re.compile(r"""\bconfig((?:\[["'][\w-]+["']\]|\.get\(["'][\w-]+["'])+)""")


def config_reads() -> set[tuple[str, ...]]:
    from ldmflow.workflow import EXPERIMENT_LISTS

    reads = {tuple(re.findall(r"""["']([\w-]+)["']""", m.group(1)))
             for path in WORKFLOW_CODE for m in CONFIG_READ.finditer(path.read_text())}
    return reads | {(key,) for key in EXPERIMENT_LISTS}  # rules/common.smk reads config[key] for each list


def schema_paths(schema: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out |= {prefix + (key,)} | schema_paths(sub, prefix + (key,))
    return out


def test_the_workflow_config_schema_describes_every_key_the_workflow_reads_and_no_other():
    schema = load_yaml((REPO / "config/schemas/config.schema.yaml").read_text())
    described, read = schema_paths(schema), config_reads()
    assert read - described == set(), "keys the workflow reads that config.schema.yaml does not describe"
    leaves = {p for p in described if not any(q[:len(p)] == p and q != p for q in described)}
    unread = {p for p in leaves if not any(r[:len(p)] == p or p[:len(r)] == r for r in read)}
    assert unread == set(), "keys config.schema.yaml describes that the workflow never reads"
    for path in described:  # every key documented, with its default
        node = schema
        for key in path:
            node = node["properties"][key]
        assert node.get("description") and "default" in node, f"{'.'.join(path)}: description and default"


def test_the_workflow_config_schema_names_the_stages_and_lists_the_code_has():
    from ldmflow.config.common import STAGE_NAMES
    from ldmflow.workflow import EXPERIMENT_LISTS

    schema = load_yaml((REPO / "config/schemas/config.schema.yaml").read_text())
    pattern = schema["properties"]["phases"]["additionalProperties"]["items"]["pattern"]
    assert pattern == f"^({'|'.join(STAGE_NAMES)})/.+$"
    assert all(schema["properties"][key]["items"] == {"$ref": "#/$defs/experiment"} for key in EXPERIMENT_LISTS)
    assert set(STAGE_NAMES) == set(STAGES) == set(EXPERIMENT_LISTS.values())


# --------------------------------------------------------------------------------------------------
# Every dotted ldmflow name in user-facing config text resolves
# --------------------------------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w/.-])ldmflow(?:\.[A-Za-z_]\w*)+")


def resolves(dotted: str) -> bool:
    """Whether ``ldmflow.a.b.C`` names a module or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_every_ldmflow_name_in_the_schemas_and_config_files_imports():
    texts = {p: p.read_text() for p in sorted((REPO / "config").rglob("*")) if p.suffix in (".json", ".yaml")}
    texts.update({Path(name): text for name, text in schema_documents().items()})
    names = {(str(p), m.group(0)) for p, text in texts.items() for m in DOTTED.finditer(text)
             if m.group(0).rsplit(".", 1)[-1] not in ("yaml", "json", "py")}
    assert len(names) >= 3  # the memorization and judge schemas' descriptions, config.yaml's comments
    assert [f"{path}: {name}" for path, name in sorted(names) if not resolves(name)] == []
