"""How the files of this folder were made, with ldmflow before checkpoint metadata had a version (a plain
'extra' dict, read as version 0): an autoencoder, its latent store, a diffusion model and a ControlNet, each
trained one epoch on tiny shapes. Kept to show what the committed files are; rerunning it with today's code
would write the current version instead."""
from pathlib import Path

import torch

from ldmflow.data.demo import write_demo_data
from ldmflow.stages.embed import embed_latents
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.stages.train_controlnet import train_controlnet
from ldmflow.stages.train_diffusion import train_diffusion

torch.set_num_threads(1)
root = Path("/tmp/core_legacy/run")
man = write_demo_data(root / "data", n=16, size=16, seed=3)
ae = {"name": "legacy_ae", "seed": 42, "data": {"image_size": 16, "batch_size": 8, "mask_classes": 4},
      "model": {"variant": "kl", "downsample": 4, "latent_channels": 4, "base_channels": 8},
      "optim": {"lr": 3e-3}, "train": {"epochs": 1, "sample_every": 1}}
train_autoencoder(ae, man, root / "ae")
store = embed_latents(root / "ae/checkpoints/legacy_ae_checkpoint_best.pt", man, root / "latents.zarr")
d = {"name": "legacy_diffusion", "data": {"batch_size": 8},
     "model": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_levels": [],
               "head_channels": 8},
     "diffusion": {"timesteps": 20}, "sampling": {"sampler": "ddim", "steps": 3, "per_class": 1},
     "optim": {"lr": 2e-3, "warmup_steps": 1, "schedule": "constant"},
     "train": {"epochs": 1, "ema": {"decay": 0.0}, "sample_every": 1}}
train_diffusion(d, store, root / "base")
c = {"name": "legacy_controlnet", "base": "legacy_diffusion", "data": {"batch_size": 8},
     "model": {"fusion": "add", "hint_channels": 4},
     "sampling": {"sampler": "ddim", "steps": 2, "guidance": 1.0, "grid_rows": 1},
     "evaluation": {"fidelity_samples": 2}, "optim": {"lr": 3e-3, "schedule": "constant"},
     "train": {"epochs": 1, "ema": {"decay": 0.0}, "sample_every": 1}}
train_controlnet(c, store, root / "base/checkpoints/legacy_diffusion_checkpoint_best.pt", root / "cn")
