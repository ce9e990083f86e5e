"""The docs site tells the truth about the code: its generated pages come from the code, and the config keys
its hand-written pages name exist. (`make docs` builds the site with --strict, so broken links fail there.)"""

from __future__ import annotations

import importlib.util
import inspect
import re

import yaml

import ldmflow
from ldmflow.config.loading import schema_tables

from .conftest import REPO

DOCS = REPO / "docs"


def generated_pages():
    spec = importlib.util.spec_from_file_location("generated_pages", DOCS / "hooks/generated_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_shows_every_public_name_with_its_signature_and_docstring():
    page = generated_pages().api_markdown()
    for name in ldmflow.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(ldmflow, name)
        assert f"### `ldmflow.{name}`" in page, name
        assert f"def {name}(" in page, name
        first_line = inspect.cleandoc(obj.__doc__).splitlines()[0].replace("``", "`")
        assert first_line in page, (name, first_line)
    assert "'str | Path" not in page  # annotations as written, not quoted


def test_the_workflow_config_reference_lists_every_key_of_its_schema():
    page = generated_pages().workflow_config_markdown()
    schema = yaml.safe_load((REPO / "config/schemas/config.schema.yaml").read_text())
    for key, node in schema["properties"].items():
        assert f"| `{key}` |" in page, key
        for sub in node.get("properties", {}):
            assert f"| `{key}.{sub}` |" in page, f"{key}.{sub}"


def documented_keys() -> set[str]:
    """Every key of every configuration table, the workflow config's sections as prefixes of their own."""
    keys = set()
    tables = {**schema_tables(), "workflow": generated_pages().workflow_config_markdown()}
    for name, table in tables.items():
        prefix = {"memorization.schema.md": "memorization.", "judge.schema.md": "judge."}.get(name, "")
        keys |= {prefix + key for key in re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE)}
    return keys


def test_every_config_key_the_troubleshooting_page_names_exists():
    text = (DOCS / "troubleshooting.md").read_text()
    sections = ("data", "model", "loss", "optim", "train", "sampling", "diffusion", "control", "evaluation",
                "latents", "memorization", "judge", "selection", "init")
    named = {k for k in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?::[^`]*)?`", text) if k.split(".")[0] in sections}
    assert len(named) >= 30
    missing = named - documented_keys()
    assert not missing, f"docs/troubleshooting.md names keys no schema has: {sorted(missing)}"


def test_every_docs_page_is_in_the_site_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.parts}
    assert pages, "no docs pages"
    for page in pages:
        assert f": {page}" in nav, f"docs/{page} is in no mkdocs.yml nav entry"
    for page in re.findall(r": ([\w/.-]+\.md)$", nav, flags=re.MULTILINE):
        generated = page in ("reference/api.md", "reference/workflow-config.md")
        assert generated or (DOCS / page).is_file(), f"mkdocs.yml names {page}, which does not exist"

