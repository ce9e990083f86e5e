"""Fine-tuning: start a run from another run's weights (``init:`` of an experiment, ``--init`` on the command line).

The rule for tensors: every tensor of the new model is loaded from the parent checkpoint when the parent has a
tensor of that name and shape. One that does not fit (a new class count, new latent channels) or is missing
stops the run with an error naming it, unless ``init.partial`` is true: then it keeps its fresh initialisation
and the log lists it. Only weights are loaded (the parent's EMA weights when it kept them, the ones it was
validated with); the optimizer, the step count and the learning-rate schedule start fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ldmflow.artifacts import RunPaths, file_sha256, inference_weights, load_checkpoint
from ldmflow.config.common import STAGE_NAMES, InitConfig
from ldmflow.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS = Path("results")  # the workflow's results folder: where 'stage/NAME' runs live


def parent_run(source: str) -> tuple[str, str] | None:
    """(stage, name) when ``init.from`` names a workflow experiment ('diffusion/NAME'); None for a path."""
    stage, sep, name = source.partition("/")
    if sep and stage in STAGE_NAMES and name and "/" not in name and not name.endswith(".pt"):
        return stage, name
    return None


def init_checkpoint(init: InitConfig, results: Path = RESULTS) -> Path | None:
    """The checkpoint file ``init`` names (None: a fresh initialisation)."""
    if init.from_ is None:
        return None
    run = parent_run(init.from_)
    if run is None:
        return Path(init.from_)
    stage, name = run
    paths = RunPaths(results / stage / name, name)
    return paths.best if init.checkpoint == "best" else paths.latest


def initialise(model: nn.Module, init: InitConfig, checkpoint: str | Path | None = None,
               source: str = "<config>") -> dict:
    """Load the parent's weights into ``model`` by the module's rule; returns the provenance a child's checkpoints
    record (``{}`` for a fresh run): the parent's path, sha256, stage, name and epoch, and the tensors kept fresh.

    ``checkpoint`` (the command line's ``--init``) overrides the file ``init.from`` names.
    """
    path = Path(checkpoint) if checkpoint is not None else init_checkpoint(init)
    if path is None:
        return {}
    if not path.is_file():
        hint = " (train the parent first: `snakemake` plans it before this run)" if checkpoint is None else ""
        raise ConfigError(f"{source}: key 'init.from' names {path}, which does not exist{hint}")
    state = load_checkpoint(path)
    parent = inference_weights(state)
    own = model.state_dict()
    fresh = []
    for key, tensor in own.items():
        if key not in parent:
            fresh.append(f"{key} (not in the parent)")
        elif parent[key].shape != tensor.shape:
            fresh.append(f"{key} {tuple(parent[key].shape)} -> {tuple(tensor.shape)}")
    if fresh and not init.partial:
        shown = ", ".join(fresh[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "")
        raise ConfigError(f"{source}: the weights of {path} do not fit this model: {shown}; set 'init.partial: true' "
                          "to keep those tensors' fresh initialisation")
    fitting = {k: v for k, v in parent.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict({**own, **fitting})
    unused = sorted(set(parent) - set(own))
    log.info("initialised %d of %d tensors from %s (%s %s, epoch %s)", len(fitting), len(own), path,
             state.get("stage"), state.get("name"), state.get("best_epoch") or state.get("epoch"))
    if fresh:
        log.warning("init.partial: %d tensor(s) keep their fresh initialisation: %s", len(fresh), "; ".join(fresh))
    if unused:
        log.info("%d tensor(s) of the parent are not used: %s", len(unused), ", ".join(unused[:10]))
    return {"checkpoint": str(path), "sha256": file_sha256(path), "stage": state.get("stage"),
            "name": state.get("name"), "epoch": state.get("epoch"), "fresh": fresh}
