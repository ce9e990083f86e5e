"""The one YAML reader of ldmflow: PyYAML's safe loader, with numbers read as users write them.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-4`` and ``5E-3`` are strings
there and ``lr: 1e-4`` fails validation. YAML 1.2, OmegaConf and Hydra read them as floats, and so does
:class:`Loader`. A quoted scalar (``"1e-4"``) stays a string.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats (1e-4, 5E-3, .5, -2e-5, 1.0e+3) and the 1.1 forms PyYAML already reads (1_000.5, 1:30.5,
# .inf, .nan); the resolver OmegaConf installs, with a sign allowed before a leading dot (-.5).
FLOAT = re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (see the module docstring)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT, list("-+0123456789."))


def load_yaml(stream: str | bytes | IO) -> Any:
    """Parse one YAML document with :class:`Loader`: ``load_yaml("lr: 1e-4")`` is ``{'lr': 0.0001}``."""
    return yaml.load(stream, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
