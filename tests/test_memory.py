"""The GPU memory estimate (ldmflow.memory, `ldmflow memory`), the research presets against 32 GB cards, and
chunked decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmflow.cli import main
from ldmflow.config.loading import load_config
from ldmflow.diffusion.generate import decode_autocast, decode_chunked, decode_latents
from ldmflow.memory import DataShape, estimate
from ldmflow.models.autoencoder import build_autoencoder

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "config/presets"


def tiny_ae(**model):
    return load_config({"name": "t", "data": {"image_size": 32, "batch_size": 8, "mask_classes": 3,
                                              "classes": ["a", "b"]},
                        "model": {"latent_channels": 4, "base_channels": 16, **model}})


def real_saved_bytes(model: torch.nn.Module, step, batch: int) -> int:
    """What autograd keeps for a real forward pass on the CPU, once per storage, without the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(seen.values())


def test_the_estimate_is_what_a_real_cpu_pass_saves_and_grows_linearly_with_the_batch():
    cfg = tiny_ae(norm="group")
    est = estimate(cfg, "fp32")

    def step(b: int):
        model = build_autoencoder(cfg).train()
        return model, (lambda n: model(torch.randn(n, 3, 32, 32))["recon"].sum())

    model, run = step(3)
    real = real_saved_bytes(model, run, 3)
    # the estimate runs the stage's loss too (its heads' losses save little); the network's tensors dominate
    assert est.activations(3) == pytest.approx(real, rel=0.03)
    assert est.activations_per_sample > 0 and est.total() > est.weights + est.grads_optimizer


def test_checkpointing_lowers_the_activation_estimate():
    plain, ckpt = estimate(tiny_ae(), "bf16"), estimate(tiny_ae(checkpointing=True), "bf16")
    assert ckpt.activations_per_sample < 0.6 * plain.activations_per_sample
    assert ckpt.weights == plain.weights and ckpt.checkpointing and not plain.checkpointing
    unet = load_config(REPO / "config/diffusion/demo_unet_tiny.yaml")
    shape = DataShape(latent=(4, 16, 16))
    plain = estimate(unet, "bf16", shape=shape)
    unet.model.checkpointing = True
    assert estimate(unet, "bf16", shape=shape).activations_per_sample < 0.6 * plain.activations_per_sample


def test_bf16_halves_the_convolutions_but_group_norm_keeps_fp32_as_on_a_gpu():
    fp32, bf16 = estimate(tiny_ae(), "fp32"), estimate(tiny_ae(), "bf16")
    no_norm = estimate(tiny_ae(norm="none"), "bf16"), estimate(tiny_ae(norm="none"), "fp32")
    # without GroupNorm 16-bit activations take about half; with it much more than half stays fp32
    assert no_norm[0].activations_per_sample < 0.6 * no_norm[1].activations_per_sample
    assert 0.7 * fp32.activations_per_sample < bf16.activations_per_sample < fp32.activations_per_sample
    assert estimate(tiny_ae(), "fp16").activations_per_sample == bf16.activations_per_sample


def test_the_research_presets_fit_32_gb_cards_at_their_defaults():
    precision = "bf16"  # fp16 saves the same bytes (test above)
    ae = estimate(load_config(PRESETS / "autoencoders/ae_256.yaml"), precision)
    assert ae.batch * ae.accumulate == 16  # the research batch, in micro-batches
    assert ae.fits(32) and not ae.fits(16)
    # without accumulation it would not fit: the reason the preset accumulates
    assert not ae.fits(32, batch=16)
    base = load_config(PRESETS / "diffusion/unet_256.yaml")
    control = estimate(load_config(PRESETS / "controlnet/controlnet_256.yaml"), precision, base_cfg=base)
    assert estimate(base, precision).fits(16) and control.fits(16)


def test_memory_command_prints_a_table_with_the_cards(capsys):
    config = str(REPO / "config/autoencoders/demo_kl_c4_f4.yaml")
    assert main(["memory", "--config", config, "--batch", "4", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert all(col in header for col in ("params", "activations/sample", "total", "16 GB", "32 GB", "80 GB"))
    assert row.split()[:3] == ["demo_kl_c4_f4", "autoencoder", "bf16"] and row.split()[-3:] == ["yes"] * 3


def test_memory_of_a_controlnet_without_its_base_is_a_user_error(capsys):
    config = str(REPO / "config/controlnet/demo_controlnet_add.yaml")
    assert main(["memory", "--config", config]) == 2
    assert "--base" in capsys.readouterr().err


class CountingDecoder(torch.nn.Module):
    """An autoencoder decoder stand-in that records its batch sizes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.seg = torch.nn.Conv2d(4, 2, 1)
        self.calls: list[int] = []

    def decode(self, z, with_seg=False):
        self.calls.append(len(z))
        x = torch.nn.functional.interpolate(self.conv(z), scale_factor=4.0)
        return torch.tanh(x), (self.seg(z) if with_seg else None)


def test_decoding_in_chunks_gives_the_one_call_values_on_cpu():
    torch.manual_seed(0)
    decoder, z = CountingDecoder(), torch.randn(40, 4, 8, 8)
    with torch.no_grad():
        whole, whole_seg = decoder.decode(z, with_seg=True)
    images, seg = decode_chunked(decoder, z, with_seg=True)
    assert decoder.calls[1:] == [16, 16, 8] and images.dtype == torch.float32
    torch.testing.assert_close(images, whole)
    torch.testing.assert_close(seg, whole_seg)
    latents, pixels = decode_latents(decoder, z * 2.0, 2.0, batch_size=64)
    assert decoder.calls[-3:] == [16, 16, 8] and pixels.shape == (40, 32, 32, 3)
    assert (pixels == ((whole.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()).all()


@pytest.mark.parametrize(("capability", "dtype"), [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((7, 0), torch.float16), ((7, 5), torch.float16)])
def test_grids_decode_under_bf16_autocast_on_ampere_and_later_and_fp16_before(monkeypatch, capability, dtype):
    import warnings

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that CUDA is absent here
        ctx = decode_autocast(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    assert not isinstance(decode_autocast(torch.device("cpu")), torch.autocast)
