"""What a training rule runs: one stage's training function on the job's GPUs.

An edge module, like ``ldmflow.cli``: it reads the process environment it is given and starts processes. With
``gpus`` > 1 (the rule's ``gpu`` resource) the stage runs under torchrun with that many processes, rank r on
cuda:r of the devices the scheduler gave the job (DDP; torchrun needs a command, so it runs the ``ldmflow``
command line). Otherwise the stage's function is called here, on a GPU that no other job on this machine
holds (:func:`ldmflow.devices.claim_gpu`), or on the CPU when there is none.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ldmflow.cli import main, setup_logging
from ldmflow.config.common import Stage
from ldmflow.devices import check_cuda, claim_gpu
from ldmflow.errors import EXIT_PREEMPTED, CudaSetupError, exit_code
from ldmflow.stages import trainer
from ldmflow.training.preemption import SignalFlag

log = logging.getLogger("ldmflow")

# stage -> the command line's subcommand (for torchrun)
COMMANDS: dict[str, str] = {"autoencoder": "train-ae", "diffusion": "train-diffusion",
                            "controlnet": "train-controlnet"}


def run_cli(argv: list[str], nproc: int = 1) -> None:
    """Run an ``ldmflow`` command line: in this process, or under torchrun with ``nproc`` processes.

    Under torchrun, a scheduler's warning signal (SIGINT, SIGTERM, SIGUSR1, SIGUSR2) reaches the ranks, which
    save and exit 143, and torchrun, which forwards it to them and waits for them (its default list lacks
    SIGUSR1/2, whose default action would kill it). torchrun itself then exits 1, so this process, which
    only notes the signal, exits 143 for it.
    """
    if nproc <= 1:
        code = main(argv)
    else:
        signals = ",".join(s.name for s in (*SignalFlag.SIGNALS, signal.SIGHUP, signal.SIGQUIT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--signals-to-handle={signals}", "-m", "ldmflow.cli", *argv]
        with SignalFlag() as got:
            code = subprocess.run(cmd).returncode
        if code and got.received is not None:
            log.warning("torchrun exited %d after signal %s: the ranks saved their latest checkpoint", code, got.name)
            code = EXIT_PREEMPTED
    if code:
        raise SystemExit(code)


def run_training(stage: Stage, *, gpus: int, environ: Mapping[str, str], log_file: str | Path, threads: int,
                 **inputs: str | Path) -> None:
    """Train one experiment of ``stage`` from the rule's named inputs (``config``, ``out_dir``, and ``manifest``,
    ``latents`` or ``base`` as the stage's function takes them), on the job's ``gpus``.

    Exits like the command line does: 2 for a user error, 143 when preempted (the retry resumes), 1 when
    training cannot go on.
    """
    try:  # before torchrun starts: a torch that cannot use the job's GPUs is one line, not a rank's traceback
        check_cuda(gpus)
    except CudaSetupError as exc:
        setup_logging(log_file)
        log.error("%s", exc)
        raise SystemExit(exit_code(exc)) from None
    if gpus > 1:
        flags = {"manifest": "--data", "out_dir": "--out"}
        argv = ["--log-file", str(log_file), COMMANDS[stage], "--threads", str(threads)]
        for key, value in inputs.items():
            argv += [flags.get(key, f"--{key}"), str(value)]
        run_cli(argv, nproc=gpus)
        return
    setup_logging(log_file)
    fn = trainer(stage)
    try:
        with claim_gpu(environ) as device:
            fn(**inputs, device=device, threads=threads)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        log.error("%s", exc)
        raise SystemExit(code) from None
