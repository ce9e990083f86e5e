"""Progress bars for the long command-line work (training, embedding, sampling, the memorization search)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool | None = None, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; ``enabled=None``: only when stderr is a terminal, so the log files of
    Snakemake jobs and batch schedulers hold log lines, not carriage returns."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, leave=False)
