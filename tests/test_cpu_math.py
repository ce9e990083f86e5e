"""CPU settings every run takes: arithmetic (subnormals) and memory (freed blocks kept)."""

import platform

import pytest
import torch

from ldmflow.devices import set_deterministic


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="flush-to-zero is an x86 CPU mode")
def test_a_training_run_rounds_subnormal_gradients_to_zero_so_a_confident_head_does_not_slow_every_step():
    torch.set_flush_denormal(False)  # torch's default
    try:
        # a confident softmax: the wrong class's probability underflows below float32's normal range
        logits = torch.tensor([[0.0, 88.0]], requires_grad=True)
        torch.log_softmax(logits, 1)[0, 1].backward()
        assert 0 < abs(logits.grad[0, 0].item()) < torch.finfo(torch.float32).tiny  # a subnormal without the flush
        set_deterministic(42)
        logits.grad = None
        torch.log_softmax(logits, 1)[0, 1].backward()
        assert logits.grad[0, 0].item() == 0.0
    finally:
        torch.set_flush_denormal(False)


PAGE_FAULTS = """
import resource, sys, torch
from ldmflow.devices import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(1024, 1024, 4)  # 16 MiB


def batch():  # activations allocated and written layer by layer, then all freed
    a = x * 2
    b = a * 2
    c = b * 2
    d = c * 2
    del a, b, c, d


for _ in range(3):  # the first batches map their pages in either way
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    batch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_a_block_freed_and_allocated_again_reuses_its_pages_instead_of_faulting_them_in_every_batch():
    import subprocess
    import sys

    runs = {}
    for mode in ("default", "keep"):  # each in a fresh process: the settings are process-wide
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["keep"][0] == "True"
    # glibc's default (its thresholds move with the process's history): 16 MiB blocks faulted in again,
    # batch after batch (at least one block every 5 batches); kept: a few blocks' worth once, then reuse
    assert runs["default"][1] >= 10 * 4096
    assert runs["keep"][1] <= 5 * 4096
