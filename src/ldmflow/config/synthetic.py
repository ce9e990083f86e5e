"""One synthetic data set of the workflow config's ``synthetic:`` list: which model, how many images, which mix of
classes, which seed (:func:`ldmflow.stages.synthesize.synthesize`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ldmflow.errors import ConfigError

Augment = Literal["hflip", "rot90"]
AUGMENTS = ("hflip", "rot90")
MIXES = ("balanced", "train")
KEYS = ("name", "model", "n", "classes", "seed", "augment", "batch_size")


@dataclass
class SyntheticConfig:
    """A synthetic set: N images of ``model`` ('diffusion/NAME' or 'controlnet/NAME') with a class mix."""

    model: str
    name: str = ""  # default: the model's NAME
    n: int = 64
    # balanced: equal counts per class; train: the train split's class frequencies; {class: fraction}: a table
    classes: str | dict[str, float] = "balanced"
    seed: int = 0
    # a ControlNet's control masks, drawn from the train split, flipped / turned by a quarter at random
    augment: list[str] = field(default_factory=list)
    batch_size: int = 64

    def __post_init__(self) -> None:
        stage, _, model = str(self.model).partition("/")
        if stage not in ("diffusion", "controlnet") or not model:
            raise ConfigError(f"synthetic: model {self.model!r}: allowed: 'diffusion/NAME' or 'controlnet/NAME'")
        self.name = self.name or model
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"synthetic {self.name}: key 'n' is {self.n!r}; allowed: an integer >= 1")
        if isinstance(self.classes, dict):
            bad = {k: v for k, v in self.classes.items() if not (isinstance(v, (int, float)) and math.isfinite(v)
                                                                  and v >= 0)}
            if bad or not sum(self.classes.values()) > 0:
                raise ConfigError(f"synthetic {self.name}: key 'classes' {self.classes}: allowed: fractions >= 0 "
                                  "per class name, not all 0")
        elif self.classes not in MIXES:
            raise ConfigError(f"synthetic {self.name}: key 'classes' is {self.classes!r}; allowed: "
                              f"{', '.join(MIXES)} or a table {{class: fraction}}")
        unknown = set(self.augment) - set(AUGMENTS)
        if unknown:
            raise ConfigError(f"synthetic {self.name}: key 'augment' has {sorted(unknown)}; allowed: "
                              f"{', '.join(AUGMENTS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"synthetic {self.name}: key 'batch_size' is {self.batch_size!r}; allowed: >= 1")

    @property
    def stage(self) -> str:
        return self.model.partition("/")[0]

    @property
    def experiment(self) -> str:
        return self.model.partition("/")[2]


def synthetic_config(entry: SyntheticConfig | dict) -> SyntheticConfig:
    """One entry of the ``synthetic:`` list, checked: unknown keys and bad values stop with the key named."""
    if isinstance(entry, SyntheticConfig):
        return entry
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"synthetic: entry {entry!r}: give a mapping with at least 'model'")
    unknown = set(entry) - set(KEYS)
    if unknown:
        raise ConfigError(f"synthetic: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(KEYS)}")
    return SyntheticConfig(**entry)
