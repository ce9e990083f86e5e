"""CPU arithmetic settings every training run takes."""

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
