"""What a training rule runs: one stage's training function on the job's GPUs.

An edge module, like ``ldmflow.cli``: it reads the process environment it is given and starts processes. With
``gpus`` > 1 (the rule's ``gpu`` resource) the stage runs under torchrun with that many processes (DDP; torchrun
needs a command, so it runs the ``ldmflow`` command line), on ``gpus`` GPUs that no other job on this machine holds
(:func:`ldmflow.devices.claim_gpus`; torchrun's CUDA_VISIBLE_DEVICES names just those, rank r on the r-th), each
rank with its share of the job's threads. Otherwise the stage's function is called here, on one such GPU, or on
the CPU when there is none.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from ldmflow.cli import main, setup_logging
from ldmflow.config.common import Stage
from ldmflow.devices import check_cuda, claim_gpu, claim_gpus
from ldmflow.errors import EXIT_PREEMPTED, exit_code
from ldmflow.stages import trainer
from ldmflow.training.preemption import SignalFlag

log = logging.getLogger("ldmflow")

# stage -> the command line's subcommand (for torchrun)
COMMANDS: dict[str, str] = {"autoencoder": "train-ae", "diffusion": "train-diffusion",
                            "controlnet": "train-controlnet"}


def run_cli(argv: list[str], nproc: int = 1, env: Mapping[str, str] | None = None) -> None:
    """Run an ``ldmflow`` command line: in this process, or under torchrun with ``nproc`` processes (in the
    environment ``env``, this process's when None).

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
            code = subprocess.run(cmd, env=None if env is None else dict(env)).returncode
        if code and got.received is not None:
            log.warning("torchrun exited %d after signal %s: the ranks saved their latest checkpoint", code, got.name)
            code = EXIT_PREEMPTED
    if code:
        raise SystemExit(code)


def rank_threads(threads: int, nproc: int) -> int:
    """Each of ``nproc`` ranks' CPU threads: its share of the job's ``threads`` (a rule's threads, like LSF's
    LSB_DJOB_NUMPROC, count the whole job's), at least 1."""
    return max(1, threads // max(1, nproc))


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """Exit like the command line does on an error it knows: 2 for a user error, 143 when preempted."""
    try:
        yield
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        log.error("%s", exc)
        raise SystemExit(code) from None


def run_training(stage: Stage, *, gpus: int, environ: Mapping[str, str], log_file: str | Path, threads: int,
                 **inputs: str | Path) -> None:
    """Train one experiment of ``stage`` from the rule's named inputs (``config``, ``out_dir``, and ``manifest``,
    ``latents`` or ``base`` as the stage's function takes them), on the job's ``gpus``.

    Exits like the command line does: 2 for a user error, 143 when preempted (the retry resumes), 1 when
    training cannot go on.
    """
    setup_logging(log_file)
    with user_errors_exit():  # before torchrun starts: a torch that cannot use the job's GPUs is one line
        check_cuda(gpus)
    if gpus > 1:
        flags = {"manifest": "--data", "out_dir": "--out"}
        per_rank = rank_threads(threads, gpus)
        argv = ["--log-file", str(log_file), COMMANDS[stage], "--threads", str(per_rank)]
        for key, value in inputs.items():
            argv += [flags.get(key, f"--{key}"), str(value)]
        with user_errors_exit(), claim_gpus(environ, gpus) as claim:
            env = {**environ, "OMP_NUM_THREADS": str(per_rank)}
            if claim is not None:
                env["CUDA_VISIBLE_DEVICES"] = claim.visible_devices
            run_cli(argv, nproc=gpus, env=env)
        return
    fn = trainer(stage)
    with user_errors_exit(), claim_gpu(environ) as device:
        fn(**inputs, device=device, threads=threads)
