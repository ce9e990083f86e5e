"""Bad inputs end in one named line and a documented exit code, never a traceback or a silently wrong result.

The fuzz tests drive every subcommand's parser (and what runs after it) in-process through
``ldmflow.cli.main`` with generated hostile values, and the manifest reader with generated CSVs, on a
tiny pipeline built once per session. ``--hypothesis-show-statistics`` prints the inputs tried per test.
"""

from __future__ import annotations

import copy
import csv
import errno
import io
import itertools
import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldmflow.cli import main
from ldmflow.config.common import DataConfig
from ldmflow.data.dataset import prepare_data
from ldmflow.data.manifest import read_manifest
from ldmflow.errors import DataError

from .conftest import TINY_AE

EXIT_CODES = {0, 1, 2}  # done, cannot go on, user error (143, preempted, needs a scheduler's signal)

TINY_DIFFUSION = {
    "name": "fuzzd",
    "data": {"batch_size": 8},
    "model": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_levels": [],
              "head_channels": 8},
    "diffusion": {"timesteps": 20},
    "sampling": {"sampler": "ddim", "steps": 2, "per_class": 1, "guidance": 2.0},
    "optim": {"lr": 2e-3, "warmup_steps": 1},
    "train": {"epochs": 1, "sample_every": 5},
}
TINY_CONTROLNET = {
    "name": "fuzzc", "base": "fuzzd", "data": {"batch_size": 8}, "model": {"fusion": "add", "hint_channels": 8},
    "sampling": {"sampler": "ddim", "steps": 2, "guidance": 1.0, "grid_rows": 2},
    "evaluation": {"fidelity_samples": 2}, "train": {"epochs": 1, "sample_every": 5},
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """12 demo images, a 1-epoch autoencoder, its latent store, class-conditional and unconditional diffusion
    checkpoints and a sample folder: the inputs every command's fuzz starts from."""
    from ldmflow.data.demo import write_demo_data
    from ldmflow.stages.embed import embed_latents
    from ldmflow.stages.sample import sample_checkpoint
    from ldmflow.stages.train_autoencoder import train_autoencoder
    from ldmflow.stages.train_diffusion import train_diffusion

    root = tmp_path_factory.mktemp("tiny")
    manifest = write_demo_data(root / "data", n=12, size=16, seed=1)
    ae_cfg = {**copy.deepcopy(TINY_AE), "train": {"epochs": 1}}
    train_autoencoder(ae_cfg, manifest, root / "ae", progress=False)
    ae = root / "ae/checkpoints/tiny_checkpoint_best.pt"
    store = embed_latents(ae, manifest, root / "latents.zarr", batch_size=8, threads=1)
    train_diffusion(TINY_DIFFUSION, store, root / "cond")
    uncond = copy.deepcopy(TINY_DIFFUSION)
    uncond["name"], uncond["model"]["class_conditional"] = "fuzzu", False
    train_diffusion(uncond, store, root / "uncond")
    cond = root / "cond/checkpoints/fuzzd_checkpoint_best.pt"
    sample_checkpoint(cond, 4, root / "samples", steps=2)
    from ldmflow.stages.train_controlnet import train_controlnet

    train_controlnet(TINY_CONTROLNET, store, cond, root / "controlnet")
    configs = {}
    for name, cfg in {"ae": ae_cfg, "diffusion": TINY_DIFFUSION, "controlnet": TINY_CONTROLNET}.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    return {"root": root, "manifest": manifest, "ae": ae, "ae_run": root / "ae", "store": store, "cond": cond,
            "uncond": root / "uncond/checkpoints/fuzzu_checkpoint_best.pt", "samples": root / "samples",
            "controlnet": root / "controlnet/checkpoints/fuzzc_checkpoint_best.pt",
            **{f"{k}_config": v for k, v in configs.items()}}


@pytest.fixture(autouse=True)
def restore_logging():
    """main() points the root logger at the captured stderr; put the handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """``ldmflow ARGV`` in this process: its exit code and everything it printed."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------------------------------
# The fuzz: one hostile value (or two) in an otherwise valid command line
# --------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
HOSTILE = st.one_of(
    # negative, zero, small, huge (no mid-range values: a valid --n 1651 or --size 4000 is real work, not a test)
    st.one_of(st.integers(-(10**30), 0), st.integers(1, 3), st.integers(10**7, 10**30)).map(str),
    st.sampled_from(["0", "-1", "nan", "-nan", "inf", "-inf", "1e309", "1e-320", "0.5", "-0.0", "", " ", "None",
                     "[]", "{a: 1}", "0x10", "１２", "٣", "1_000", "true", "--", "-", "😀", "a,b,,1"]),
    TEXT,  # unicode, wrong types
    st.sampled_from(["@missing", "@file", "@dir", "@unicode", "@nested_in_file", "@empty_file"]),  # paths
)

# per command: the valid base command line (values naming the tiny fixture's inputs, or @out) and the
# options the fuzz may set (any option of the command, required or not)
COMMANDS: dict[str, tuple[dict[str, str], list[str]]] = {
    "demo-data": ({"--out": "@out", "--n": "4", "--size": "8"}, ["--seed", "--set"]),
    "train-ae": ({"--config": "ae_config", "--data": "manifest", "--out": "@out", "--device": "cpu"},
                 ["--threads", "--set"]),
    "select-ae": ({"--runs": "ae_run", "--out": "@out/selected.json"}, ["--metric", "--mode", "--set"]),
    "embed": ({"--checkpoint": "ae", "--data": "manifest", "--out": "@out/latents.zarr", "--device": "cpu"},
              ["--batch-size", "--dtype", "--threads", "--set"]),
    "train-diffusion": ({"--config": "diffusion_config", "--latents": "store", "--out": "@out", "--device": "cpu"},
                        ["--threads", "--set"]),
    "train-controlnet": ({"--config": "controlnet_config", "--latents": "store", "--base": "cond", "--out": "@out",
                          "--device": "cpu"}, ["--threads", "--set"]),
    "sample": ({"--checkpoint": "cond", "--out": "@out", "--n": "2", "--steps": "2", "--device": "cpu"},
               ["--class", "--guidance", "--sampler", "--control", "--scale", "--seed", "--batch-size", "--set"]),
    "sample:controlnet": ({"--checkpoint": "controlnet", "--control": "0", "--out": "@out", "--n": "2",
                           "--steps": "2", "--device": "cpu"},
                          ["--class", "--guidance", "--scale", "--seed", "--batch-size", "--set"]),
    "memorization": ({"--train": "manifest", "--samples": "samples", "--out": "@out", "--device": "cpu",
                      "--set": "quality=false"}, ["--reference"]),
    "synthesize": ({"--checkpoint": "cond", "--out": "@out", "--n": "2", "--device": "cpu"},
                   ["--classes", "--augment", "--seed", "--batch-size", "--set"]),
    "schemas": ({"--out": "@out"}, []),
    "export": ({"--checkpoint": "cond", "--out": "@out"}, ["--memorization", "--autoencoder", "--set"]),
}
SET_KEYS = ["n", "size", "seed", "steps", "guidance", "control", "scale", "batch_size", "class_id", "metric", "mode",
            "dtype", "k", "alpha", "image_size", "feature", "resize", "train.epochs", "data.image_size", "optim.lr",
            "colour", ""]


def complete_outputs(command: str, out: Path) -> list[Path]:
    """The files that would make OUT look like a finished run of COMMAND."""
    if not out.exists():
        return []
    if out.is_file():
        return [out] if command == "select-ae" else []
    names = {"demo-data": ["manifest.csv"], "sample": ["samples.zarr", "grid.png"],
             "sample:controlnet": ["samples.zarr", "grid.png"], "memorization": ["summary.json"],
             "embed": ["zarr.json"], "export": ["ldmflow.json"], "synthesize": ["manifest.csv"]}.get(command, [])
    found = [out / n for n in names if (out / n).exists()]
    return found + (list(out.glob("checkpoints/*_checkpoint_best.pt")) if command.startswith("train") else [])


@st.composite
def command_lines(draw, command: str):
    base, extra = COMMANDS[command]
    options = dict(base)
    for name in draw(st.lists(st.sampled_from([*base, *extra]), min_size=1, max_size=2, unique=True)):
        if name == "--set":
            key = draw(st.sampled_from(SET_KEYS))
            options[name] = f"{key}={draw(HOSTILE)}" if draw(st.booleans()) else draw(HOSTILE)
        elif draw(st.integers(0, 9)) == 0:
            options.pop(name, None)  # a missing (maybe required) option
        else:
            options[name] = draw(HOSTILE)
    return options


counter = itertools.count()


def materialise(options: dict[str, str], tiny: dict, scratch: Path) -> tuple[list[str], Path | None]:
    """Turn fixture names and @tokens into paths in a fresh scratch folder; return argv and the --out path."""
    scratch.mkdir(parents=True)
    (scratch / "file.txt").write_text("not what you think\n")
    (scratch / "empty").write_bytes(b"")
    (scratch / "dir").mkdir()
    tokens = {"@missing": scratch / "missing.png", "@file": scratch / "file.txt", "@dir": scratch / "dir",
              "@unicode": scratch / "ünïcødé ✓" / "x", "@nested_in_file": scratch / "file.txt" / "x",
              "@empty_file": scratch / "empty"}
    argv, out = [], None
    for name, value in options.items():
        if value.startswith("@out"):
            value = str(scratch / "out" / value[len("@out/"):]) if "/" in value else str(scratch / "out")
        elif value in tokens:
            value = str(tokens[value])
        elif value in tiny:
            value = str(tiny[value])
        if name == "--out":
            out = Path(value)
        argv += [name, value]
    return argv, out


# inputs per command: fewer where a valid-by-chance input runs a real (tiny) training or plot
EXAMPLES = {"select-ae": 12, "train-ae": 20, "train-diffusion": 20, "train-controlnet": 15}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_fuzzed_command_lines_exit_with_a_named_error_or_succeed(command, tiny, tmp_path, capsys, monkeypatch):

    @settings(max_examples=EXAMPLES.get(command, 30), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(options=command_lines(command))
    def check(options):
        scratch = tmp_path / f"ex{next(counter)}"
        argv, out = materialise(options, tiny, scratch)
        monkeypatch.chdir(scratch)  # a fuzzed value is often a relative path: keep what it makes in here
        existed = out is not None and out.exists()
        code, printed = run(capsys, [command.partition(":")[0], *argv])
        tried[code] = tried.get(code, 0) + 1
        assert code in EXIT_CODES, (argv, code, printed[-2000:])
        assert "Traceback" not in printed, (argv, printed[-3000:])
        if code:
            assert printed.strip(), argv  # a failure says why
            if out is not None and not existed:
                assert not complete_outputs(command, out), (argv, printed[-1000:])

    tried: dict[int, int] = {}
    check()
    with capsys.disabled():  # with -s: the count of inputs tried, by exit code (for the closing note)
        print(f"\n{command}: {sum(tried.values())} inputs, exit codes {dict(sorted(tried.items()))}")


# --------------------------------------------------------------------------------------------------
# The manifest reader on generated CSVs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), colour).save(root / f"img{i}.png")
    (root / "img0_copy.png").write_bytes((root / "img0.png").read_bytes())  # same content, another name
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "sub").mkdir()
    return root


IMAGE_CELLS = st.sampled_from(["img0.png", "img1.png", "img2.png", "img0_copy.png", "./img1.png", "broken.png",
                               "missing.png", "", " img2.png ", "sub", "ünï.png"])
LABEL_CELLS = st.one_of(st.sampled_from(["0", "1", "2", " 1 ", "circle", "Circle", " square", "", "12345678901",
                                         "-1", "٣", "1.0", "nan"]), TEXT)
SPLIT_CELLS = st.sampled_from(["train", "val", "test", "", "TRAIN", "validation"])


@st.composite
def manifests(draw):
    columns = ["image"] + [c for c in ("label", "split", "mask", "extra") if draw(st.integers(0, 3)) == 0]
    if draw(st.integers(0, 19)) == 0:
        columns = columns[1:] or ["label"]  # no image column
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        cells = {"image": IMAGE_CELLS, "label": LABEL_CELLS, "split": SPLIT_CELLS, "mask": IMAGE_CELLS,
                 "extra": TEXT}
        rows.append([draw(cells[c]) for c in columns])
    return columns, rows


def split_sides(data) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    contents = {p: Path(p).read_bytes() for p in data.paths}
    for path, side in zip(data.paths, data.split):
        sides.setdefault(contents[path], set()).add(side)
    return sides


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=manifests(), val_fraction=st.sampled_from([0.0, 0.2, 0.5]), seed=st.integers(0, 3))
def test_fuzzed_manifests_are_read_or_refused_with_a_data_error(images, table, val_fraction, seed):
    columns, rows = table
    path = images / "m.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    try:
        data = prepare_data(path, DataConfig(image_size=8, val_fraction=val_fraction), seed=seed, threads=1)
    except DataError as exc:
        assert str(exc).startswith(str(path)), exc  # names the manifest (and the row, where there is one)
        return
    if data.classes is not None:
        assert all(c and c == c.strip() for c in data.classes), data.classes  # no '' or ' x' class
        assert len({c.casefold() for c in data.classes}) == len(data.classes), data.classes
    for sides in split_sides(data).values():
        assert sides <= {"train"} or sides <= {"val"} or sides <= {"test"}, sides  # one image, one side


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=64), TEXT.map(lambda t: t.encode()),
                         st.sampled_from([b"", b"\n", b"image\n", b"image,label\n\n", b'"unclosed\n', b"\xff\xfe"])))
def test_fuzzed_manifest_bytes_give_a_data_error_not_a_parser_error(images, content):
    path = images / "raw.csv"
    path.write_bytes(content)
    try:
        read_manifest(path)
    except DataError as exc:
        assert str(path) in str(exc)


# --------------------------------------------------------------------------------------------------
# The examples, one by one
# --------------------------------------------------------------------------------------------------


def test_a_user_error_is_one_line_and_exit_2_and_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    argv = ["sample", "--checkpoint", tiny["uncond"], "--out", tmp_path / "s", "--guidance", "3", "--steps", "2"]
    code, printed = run(capsys, argv)
    assert code == 2 and "Traceback" not in printed
    assert "--guidance 3: this checkpoint is unconditional" in printed
    assert len([line for line in printed.splitlines() if "ERROR" in line]) == 1
    assert not (tmp_path / "s" / "samples.zarr").exists()
    code, printed = run(capsys, ["--debug", *argv])
    assert code == 2 and "Traceback" in printed and "SamplingError" in printed
    monkeypatch.setenv("LDMFLOW_DEBUG", "1")
    code, printed = run(capsys, argv)
    assert code == 2 and "Traceback" in printed


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--steps", "0", "argument --steps: 0 is out of range; allowed: 1..100000"),
    ("--batch-size", "0", "argument --batch-size: 0 is out of range"),
    ("--guidance", "nan", "argument --guidance: 'nan' is not a finite number"),
    ("--guidance", "inf", "argument --guidance: 'inf' is not a finite number"),
    ("--n", "-3", "argument --n: -3 is out of range"),
    ("--seed", "-1", "argument --seed: -1 is out of range"),
    ("--device", "banana", "argument --device: 'banana'; allowed: auto, cpu, cuda, cuda:N, mps"),
    ("--set", "steps=0", "--set steps: 0 is out of range"),
    ("--steps", "500", "--steps 500: allowed: 1..20 (the model's trained timesteps)"),
])
def test_bad_sampling_options_are_named(tiny, tmp_path, capsys, option, value, message):
    code, printed = run(capsys, ["sample", "--checkpoint", tiny["cond"], "--out", tmp_path / "s", option, value])
    assert code == 2 and message in printed and "Traceback" not in printed
    assert not (tmp_path / "s" / "grid.png").exists()


def test_out_naming_an_existing_file_is_a_usage_error(tiny, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, printed = run(capsys, ["sample", "--checkpoint", tiny["cond"], "--out", tmp_path / "f"])
    assert code == 2 and "is a file; give a folder" in printed and (tmp_path / "f").read_text() == "x"


def test_unconditional_samples_record_no_guidance_and_an_earlier_calls_files_are_cleared(tiny, tmp_path, capsys):
    out = tmp_path / "s"
    assert run(capsys, ["sample", "--checkpoint", tiny["cond"], "--out", out, "--n", "5", "--steps", "2"])[0] == 0
    assert zarr.open_group(str(out / "samples.zarr"), mode="r").attrs["guidance"] == 2.0  # the config's, applied
    (out / "notes.txt").write_text("mine")
    assert run(capsys, ["sample", "--checkpoint", tiny["uncond"], "--out", out, "--n", "2", "--steps", "2"])[0] == 0
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_00000.png", "sample_00001.png"]
    assert zarr.open_group(str(out / "samples.zarr"), mode="r").attrs["guidance"] is None  # none was applied
    assert (out / "notes.txt").read_text() == "mine"


def test_memorization_refuses_samples_of_another_size_unless_asked_to_resize(tiny, tmp_path, capsys):
    from ldmflow.data.demo import write_demo_data

    train32 = write_demo_data(tmp_path / "d32", n=6, size=32, seed=2)
    argv = ["memorization", "--train", train32, "--samples", tiny["samples"], "--out", tmp_path / "m",
            "--set", "quality=false"]
    code, printed = run(capsys, argv)
    assert code == 2 and "training 32x32 colour (6); samples 16x16 colour (4)" in printed
    assert "--set resize=true" in printed and not (tmp_path / "m" / "summary.json").exists()
    code, printed = run(capsys, [*argv, "--set", "resize=true"])
    assert code == 0
    notes = yaml.safe_load((tmp_path / "m" / "summary.json").read_text())["notes"]
    assert any("resized to 64x64 (resize: true)" in n for n in notes)


def test_an_empty_manifest_is_a_data_error(tmp_path, capsys):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text("image,label\n")
    for name, message in (("empty.csv", "empty manifest"), ("header.csv", "a header but no rows")):
        with pytest.raises(DataError, match=message):
            read_manifest(tmp_path / name)


def write_manifest(root: Path, rows: list[tuple[str, str]], n_images: int) -> Path:
    for i in range(n_images):
        Image.new("RGB", (8, 8), (20 * i, 255 - 20 * i, 0)).save(root / f"{i}.png")
    path = root / "m.csv"
    path.write_text("image,label\n" + "".join(f"{image},{label}\n" for image, label in rows))
    return path


def test_repeated_rows_and_copies_stay_on_one_side_of_the_split(tmp_path, caplog):
    rows = [(f"{i}.png", "a") for i in range(10)] * 2  # every image twice: as the manifest
    (tmp_path / "copy.png").write_bytes(b"")
    path = write_manifest(tmp_path, rows, 10)
    (tmp_path / "copy.png").write_bytes((tmp_path / "3.png").read_bytes())  # one more: same content, new name
    path.write_text(path.read_text() + "copy.png,a\n")
    data = prepare_data(path, DataConfig(image_size=8, val_fraction=0.3), seed=0)
    train = {Path(p).read_bytes() for p, s in zip(data.paths, data.split) if s == "train"}
    val = [Path(p).read_bytes() for p, s in zip(data.paths, data.split) if s == "val"]
    assert val and not any(v in train for v in val)
    assert "11 row(s) repeat an earlier row's image" in caplog.text and "11 (= row 1)" in caplog.text
    side = dict(zip((Path(p).name for p in data.paths), data.split))
    assert side["copy.png"] == side["3.png"]


def test_a_copy_with_another_label_is_refused_naming_both_rows(tmp_path):
    path = write_manifest(tmp_path, [("0.png", "a"), ("1.png", "b"), ("0.png", "b")], 2)
    with pytest.raises(DataError, match=r"rows 1 and 3 are the same image with different labels \('a', 'b'\)"):
        read_manifest(path)


@pytest.mark.parametrize(("labels", "message"), [
    (["0", "circle", "1", "square"], r"mixes integer ids \(rows 1, 3\) and names \(rows 2, 4\)"),
    (["circle", "Circle", "square", "square"], "rows 1 and 2: labels 'circle' and 'Circle' differ only in case"),
    (["circle", "", "square", "square"], "row 2: empty label while other rows have one"),
    (["1", "12345678901", "0", "0"], "row 2: integer label 12345678901; allowed ids 0..9999"),
])
def test_labels_that_would_make_wrong_classes_are_refused_naming_the_rows(tmp_path, labels, message):
    path = write_manifest(tmp_path, [(f"{i}.png", lab) for i, lab in enumerate(labels)], len(labels))
    with pytest.raises(DataError, match=message):
        prepare_data(path, DataConfig(image_size=8), threads=1)


def test_labels_are_stripped_and_an_empty_column_means_unlabelled(tmp_path):
    path = write_manifest(tmp_path, [("0.png", " circle"), ("1.png", "square "), ("2.png", "circle")], 3)
    data = prepare_data(path, DataConfig(image_size=8), threads=1)
    assert data.classes == ["circle", "square"] and data.labels.tolist() == [0, 1, 0]
    path.write_text("image,label\n0.png,\n1.png, \n2.png,\n")
    assert not prepare_data(path, DataConfig(image_size=8), threads=1).has_labels


def test_finite_checks_are_not_fooled_by_spellings():
    from ldmflow.cli import float_range

    parse = float_range(0.0, 100.0)
    for text in ("nan", "NaN", "-nan", "inf", "Infinity", "1e309"):
        with pytest.raises(Exception, match="finite"):
            parse(text)
    assert math.isclose(parse(" 7.5 "), 7.5) and np.isfinite(parse("1e-320"))


def test_non_finite_samples_stop_before_anything_is_written(tiny, tmp_path, capsys):
    import torch

    state = torch.load(tiny["cond"], weights_only=True)
    for weights in (state["model"], state.get("ema") or {}):
        for value in weights.values():
            if value.is_floating_point():
                value.fill_(float("nan"))  # a diverged model: every output NaN
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    code, printed = run(capsys, ["sample", "--checkpoint", broken, "--out", tmp_path / "s", "--n", "2"])
    assert code == 2 and "sampling produced non-finite latents" in printed and "Traceback" not in printed
    assert not list((tmp_path / "s").glob("*.png")) and not (tmp_path / "s" / "samples.zarr").exists()


# --------------------------------------------------------------------------------------------------
# Image files and file-system faults, generated
# --------------------------------------------------------------------------------------------------

IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
IMAGE_FORMATS = ["PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP"]


@st.composite
def image_files(draw) -> bytes:
    """An image file of a drawn format, mode and size, then maybe truncated, corrupted or given a huge header."""
    from hypothesis import assume

    mode, fmt = draw(st.sampled_from(IMAGE_MODES)), draw(st.sampled_from(IMAGE_FORMATS))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    pixels = np.random.default_rng(draw(st.integers(0, 9))).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA").convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray(pixels[..., 0].astype(np.int32) * 200).convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # this format cannot hold this mode
    data = bytearray(buf.getvalue())
    fault = draw(st.sampled_from(["none", "truncate", "flip", "huge"]))
    if fault == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif fault == "flip" and data:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif fault == "huge" and fmt == "PNG":
        data[16:24] = struct.pack(">II", draw(st.sampled_from([0, 7, 65535])), 65535)  # the IHDR's width, height
    return bytes(data)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(content=image_files(), as_mask=st.booleans(), skip=st.booleans())
def test_fuzzed_image_files_are_read_or_refused_with_a_data_error(images, content, as_mask, skip):
    path = images / "fuzzed.img"
    path.write_bytes(content)
    rows = [["image", "mask"], ["img0.png", "img0.png"], ["img1.png", "img1.png"],
            ["img2.png" if as_mask else "fuzzed.img", "fuzzed.img" if as_mask else "img2.png"]]
    for i in range(3):
        Image.new("L", (8, 8), i).save(images / f"mask{i}.png")
    manifest = images / "fuzz.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    try:
        data = prepare_data(manifest, DataConfig(image_size=8, skip_bad_rows=skip, mask_values=list(range(256))),
                            threads=1)
    except DataError as exc:
        assert str(exc).startswith(str(manifest)), exc
        return
    assert len(data.paths) in (2, 3)


FS_CALLS = ["mkdir", "open", "fsync", "replace"]
FS_ERRNOS = [errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.ESTALE, errno.EACCES, errno.ENOENT]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=st.sampled_from(FS_CALLS), number=st.sampled_from(FS_ERRNOS), size=st.integers(0, 4096))
def test_fuzzed_file_system_faults_in_an_atomic_write_are_one_named_error_and_lose_nothing(tmp_path, call, number,
                                                                                           size):
    import builtins
    import os
    from unittest import mock

    from ldmflow.artifacts import atomic_write_bytes
    from ldmflow.errors import exit_code

    folder = tmp_path / f"{call}{number}{size}"
    target = folder / "sub" / "file.bin"
    atomic_write_bytes(target, b"previous")

    def fail(*_args, **_kwargs):
        raise OSError(number, os.strerror(number))

    where = {"mkdir": (Path, "mkdir"), "open": (builtins, "open"), "fsync": (os, "fsync"), "replace": (os, "replace")}
    with mock.patch.object(*where[call], fail), pytest.raises(Exception) as info:
        atomic_write_bytes(target, b"x" * size)
    assert exit_code(info.value) == 2 and str(target) in str(info.value) and errno.errorcode[number] in str(info.value)
    assert target.read_bytes() == b"previous" and os.listdir(target.parent) == ["file.bin"]
