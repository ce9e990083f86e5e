import re
import tomllib

import yaml

from .conftest import REPO

# conda-forge names that differ from PyPI's
CONDA_NAMES = {"pytorch": "torch"}


def normalise(spec: str) -> tuple[str, str]:
    """(name, version) of a pip or conda requirement; a conda build string ("pytorch >=2.10 cuda*") is left out."""
    name, version = re.match(r"^([A-Za-z0-9_.-]+)\s*(\S*)", spec.strip()).groups()
    return CONDA_NAMES.get(name.lower(), name.lower()).replace("_", "-"), version


def test_conda_env_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = dict(normalise(d) for d in project["dependencies"])
    env = yaml.safe_load((REPO / "envs" / "ldmflow.yaml").read_text())
    conda = dict(normalise(d) for d in env["dependencies"]
                 if isinstance(d, str) and not d.startswith(("python", "pip")))
    assert conda == pip


def test_torch_floor_excludes_releases_whose_weights_only_load_can_run_code():
    # GHSA-53q9-r3pm-6pq6 (fixed in 2.6.0) and GHSA-63cw-57p8-fm3p (fixed in 2.10.0): checkpoints are shared
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = dict(normalise(d) for d in project["dependencies"])["torch"]
    major, minor = (int(x) for x in re.match(r">=(\d+)\.(\d+)", floor).groups())
    assert (major, minor) >= (2, 10)


def test_the_conda_environment_asks_for_a_cuda_build_of_torch():
    # built on a login node without a GPU, an unpinned pytorch resolves to the CPU build; GPU jobs would stop
    env = yaml.safe_load((REPO / "envs" / "ldmflow.yaml").read_text())
    torch_spec = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("pytorch"))
    assert torch_spec.split()[2:] == ["cuda*"]
