"""Every command of the README's and the docs pages' ```bash blocks runs, as printed, in a fresh copy of the
project; the README stays a short door (its length, its first screen, its links into the docs).

Each command runs in bash after the `source` lines above it in its block (so `source .venv/bin/activate`
holds for the lines after it); a block of `ldmflow` commands, a chain, runs as one script that stops at
the first command that fails. What cannot run here runs as close to the printed command as it can:
- `snakemake ...` as a dry run (`-n` added when the command would run jobs), so cluster profiles plan
  without a cluster;
- `make TARGET` as `make -n TARGET` (the targets install packages or run the whole workflow);
- `ldmflow ...` as printed, on the demo experiments shrunk to tiny sizes (tests/test_workflow.make_tiny);
- `source .venv/bin/activate` activates the environment the tests run in (the copy's `.venv` links to it);
- `... | dot -Tsvg > FILE` needs graphviz; without it a stand-in `dot` checks that it was given a graph.
A command of any other program fails the test: teach this file how to run it, or leave it out of ```bash.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .test_workflow import make_tiny, project_copy, smk_env

README = REPO / "README.md"
# the pages whose ```bash blocks run: the README and the docs site's Markdown pages
PAGES = [README, *sorted(p for p in (REPO / "docs").rglob("*.md") if "hooks" not in p.parts)]
MAX_README_LINES = 300
PROGRAMS = ("snakemake", "make", "ldmflow", "source")
# snakemake options that run no job (so no -n is added)
NO_JOBS = ("-n", "--dry-run", "--dryrun", "--dag", "--rulegraph", "--filegraph", "--lint", "--summary",
           "--list-rules")


def strip_comment(line: str) -> str:
    """LINE without its shell comment (a `#` at a word start, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block of a Markdown text, comments and blank lines dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    return [[cmd for cmd in map(strip_comment, block.splitlines()) if cmd] for block in blocks]


def as_run_here(command: str) -> str:
    """The command as the test runs it: snakemake as a dry run, make as `make -n`; others unchanged."""
    program = command.split()[0]
    if program not in PROGRAMS:
        raise AssertionError(f"command {command!r}: tests/test_readme.py does not know how to run "
                             f"{program!r} (allowed: {', '.join(PROGRAMS)})")
    if program == "snakemake":
        first = command.split("|", 1)[0].split()
        if not any(word in NO_JOBS for word in first):
            return "snakemake -n" + command[len("snakemake"):]
    if program == "make":
        return "make -n" + command[len("make"):]
    return command


def page_id(page: Path) -> str:
    return page.relative_to(REPO).with_suffix("").as_posix().replace("/", "-")


BLOCKS = {page_id(page): bash_blocks(page.read_text()) for page in PAGES}


def runs() -> list:
    """One test per command, after the block's `source` lines before it (seconds: dry runs); a block of
    ldmflow commands, a chain where each uses the last one's outputs, as one test (minutes: slow)."""
    params = []
    for page, blocks in BLOCKS.items():
        for i, block in enumerate(blocks):
            if any(c.startswith("ldmflow ") for c in block):
                params.append(pytest.param(block, id=f"{page}-block{i}", marks=pytest.mark.slow))
                continue
            for j, command in enumerate(block):
                if not command.startswith("source "):
                    sourced = [c for c in block[:j] if c.startswith("source ")]
                    params.append(pytest.param([*sourced, command], id=f"{page}-block{i}-line{j}"))
    return params


def fresh_copy(root: Path) -> Path:
    """The project's tracked files (a fresh clone's), with tiny demo experiments and `.venv` -> this venv."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=False)
    if listed.returncode != 0:  # not a git checkout: the workflow's parts and the Makefile
        project_copy(root)
        shutil.copy(REPO / "Makefile", root / "Makefile")
    else:
        for name in filter(None, listed.stdout.split("\0")):
            src, dst = REPO / name, root / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                dst.symlink_to(src.readlink())
            elif src.is_file():  # listed but deleted in this checkout: a fresh clone would not have it
                shutil.copy2(src, dst)
    venv = Path(sys.prefix)
    if (venv / "bin/activate").is_file():
        (root / ".venv").symlink_to(venv)
    else:  # not a venv (e.g. conda): an activate script that puts this interpreter's bin first
        (root / ".venv/bin").mkdir(parents=True)
        (root / ".venv/bin/activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return make_tiny(root)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return fresh_copy(tmp_path_factory.mktemp("readme"))


def test_the_readme_has_the_cluster_usage_in_its_first_screen():
    first_screen = "\n".join(README.read_text().splitlines()[:40])
    for command in ("make demo", "make test", "snakemake --profile slurm all", "snakemake --profile lsf all",
                    "--forcerun", "--rulegraph | dot"):
        assert command in first_screen, command
    assert first_screen.index("make test") < first_screen.index("snakemake --profile slurm all")


def test_the_readme_is_a_short_door_of_at_most_300_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert not re.search(r"\bissue \d+|\b20\d\d-\d\d-\d\d\b", README.read_text()), "history goes to CHANGELOG.md"


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (mkdocs) and GitHub give a heading: lower case, punctuation dropped."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text)


def links(text: str) -> list[str]:
    """The relative targets of a Markdown text's links and images (web addresses left out)."""
    found = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in found if not re.match(r"[a-z]+://|mailto:", t)]


def test_every_readme_link_resolves_to_a_file_and_its_heading():
    targets = links(README.read_text())
    assert any(t.startswith("docs/") for t in targets), "the README links into the docs"
    for target in targets:
        path, _, anchor = target.partition("#")
        file = REPO / path if path else README
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"README links to {target}: no such heading"


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))


def ldmflow_commands() -> set[str]:
    from ldmflow.cli import build_parser

    parser = build_parser()
    return {name for action in parser._subparsers._group_actions for name in action.choices}


def test_every_make_target_and_ldmflow_command_the_pages_name_exists():
    """Also the ones in running text (`make docs`, `ldmflow status`), which the runs below do not reach."""
    known = {"make": make_targets(), "ldmflow": ldmflow_commands()}
    named = 0
    for page in PAGES:
        for program, word in code_commands(page.read_text()):
            named += 1
            assert word in known[program], f"{page.name} names `{program} {word}`, which does not exist"
    assert named >= 20


def code_commands(text: str) -> list[tuple[str, str]]:
    """(program, first word) of each `make ...` and `ldmflow ...` in the text's code: its inline code spans and
    the lines of its fenced blocks (a `$ ` prompt dropped; options before the word skipped)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))
    out = []
    for code in [*spans, *(line for block in fenced for line in block.splitlines())]:
        words = code.strip().removeprefix("$ ").split()
        if len(words) > 1 and words[0] in ("make", "ldmflow"):
            rest = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
            if rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):
                out.append((words[0], rest[0]))
    return out


@pytest.mark.parametrize("commands", runs())
def test_every_readme_and_docs_command_runs_as_printed(project, tmp_path, commands):
    script = "\n".join(["set -euo pipefail", *(f"echo '+ {c}' >&2\n{as_run_here(c)}" for c in commands)])
    env = {**smk_env(), "PATH": os.environ.get("PATH", "")}  # the README's own `source` picks the venv
    if not shutil.which("dot"):  # no graphviz here: a stand-in `dot` that checks it is given a graph
        stub = tmp_path / "bin/dot"
        stub.parent.mkdir()
        stub.write_text('#!/bin/sh\ncase "$(cat)" in *digraph*) echo "<svg/>";; *) exit 1;; esac\n')
        stub.chmod(0o755)
        env["PATH"] = f"{stub.parent}:{env['PATH']}"
    proc = subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    ran = [line[2:] for line in proc.stderr.splitlines() if line.startswith("+ ")]
    print("\n".join(f"ran: {as_run_here(c)}" for c in ran))
    assert proc.returncode == 0, f"command {ran[-1] if ran else '?'!r} failed:\n{proc.stderr[-4000:]}"
    assert ran == commands
