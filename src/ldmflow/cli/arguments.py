"""What every command group of the command line builds its parsers with: the checked argument types, ``--set``
and :func:`add_command`."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import yaml

from ldmflow.config.yamlio import load_yaml
from ldmflow.errors import ConfigError

# Upper bounds of the plain commands' numbers: far above any real use, low enough that a typo (an extra
# zero, a pasted timestamp) fails at once instead of allocating memory or running for days.
MAX_IMAGES = 1_000_000
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both accept 0..2**32-1
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond ~20 saturates every pixel; 100 leaves room for experiments


# --------------------------------------------------------------------------------------------------
# Argument types: every value is checked when the command line is parsed, so a bad one is a usage error
# (exit 2, one line naming the option and what is allowed) before any work starts.
# --------------------------------------------------------------------------------------------------


def number_range(kind: type, minimum: float, maximum: float):
    """An argparse ``type=``: an ``int`` or a finite ``float`` in ``minimum..maximum`` (NaN and infinity are
    refused)."""
    word, fmt = ("an integer", "{}") if kind is int else ("a number", "{:g}")
    allowed = f"allowed: {fmt.format(minimum)}..{fmt.format(maximum)}"

    def parse(text: str):
        try:
            value = kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}; {allowed}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; {allowed}")
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{fmt.format(value)} is out of range; {allowed}")
        return value

    return parse


def int_range(minimum: int, maximum: int):
    """An argparse ``type=``: an integer in ``minimum..maximum``."""
    return number_range(int, minimum, maximum)


def float_range(minimum: float, maximum: float):
    """An argparse ``type=``: a finite number in ``minimum..maximum``."""
    return number_range(float, minimum, maximum)


def _path(text: str) -> Path:
    text = str(text)
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path")
    return Path(text)


def existing_path(text: str) -> Path:
    """An argparse ``type=``: a file or folder that exists."""
    path = _path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return path


def existing_file(text: str) -> Path:
    """An argparse ``type=``: a file that exists (not a folder)."""
    path = existing_path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file")
    return path


def _creatable(path: Path, text: str) -> None:
    """The nearest existing parent of ``path`` must be a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent} is not writable")


def output_dir(text: str) -> Path:
    """An argparse ``type=``: an output folder that exists, or can be created (never an existing file)."""
    path = _path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder (existing or new)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    else:
        _creatable(path, text)
    return path


def output_file(text: str) -> Path:
    """An argparse ``type=``: an output file (replaced when it exists) whose folder exists or can be created."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not path.exists():
        _creatable(path, text)
    return path


DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def device_name(text: str) -> str:
    """An argparse ``type=``: auto, cpu, mps, cuda or cuda:N, refused when this machine lacks it."""
    text = str(text).strip()
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    if text == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("'mps': not available on this machine")
    return text


def _apply_sets(args: argparse.Namespace, allowed: tuple[str, ...],
                types: dict[str, argparse.Action] | None = None) -> None:
    """For commands without a config file, ``--set key=value`` sets one of the command's options.

    A key that is also an option of the command is checked like the option (``--set steps=0`` is refused
    as ``--steps 0`` is); other keys (the memorization options) are parsed as YAML and validated later.
    """
    types = types if types is not None else getattr(args, "set_types", None) or {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ConfigError(f"--set {item!r}: allowed keys for this command: {', '.join(allowed)}")
        action = types.get(key)
        if action is not None:
            try:
                value = action.type(raw) if action.type else raw
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"--set {key}: {exc}") from None
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f"--set: key {key!r} has value {value!r}; allowed: "
                                  f"{', '.join(map(str, action.choices))}")
        else:
            try:
                value = load_yaml(raw)  # 1e-4 is a number, as in a config file
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: not a YAML value ({str(exc).splitlines()[0]})") from None
        setattr(args, key, value)


def add_command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A subcommand calling ``func(args)``, with the ``--set KEY=VALUE`` every command takes."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted.key=value, value parsed as YAML); repeatable")
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")


def add_device_and_threads(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, the options of every command that runs a network."""
    add_device(p)
    p.add_argument("--threads", type=int_range(1, 1024), default=None, help="CPU threads for torch and data loading")
