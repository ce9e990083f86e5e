"""The model card (``README.md``) of an exported folder, written from its :class:`ExportInfo` alone."""

from __future__ import annotations

import json

import yaml

from ldmflow.exporting.bundle import ExportInfo
from ldmflow.metadata import DiffusionMeta

_DIFFUSERS_USE = """\
```python
import torch
from diffusers import DDIMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{folder}").eval()
scheduler = DDIMScheduler.from_pretrained("{folder}", subfolder="scheduler")
scheduler.set_timesteps(50)
x = torch.randn(4, {channels}, {size}, {size})  # scaled latents
{labels}for t in scheduler.timesteps:
    with torch.no_grad():
        out = unet(x, t, {label_arg}).sample
    x = scheduler.step(out, t, x).prev_sample
latents = x / {scale}  # then decode them with the autoencoder
```
"""


def _diffusers_section(info: ExportInfo, folder: str) -> list[str]:
    if info.diffusers is None:
        return ["## diffusers", "", f"Not loadable by diffusers exactly: {info.diffusers_refused or 'no equivalent'}."
                " Load it with `ldmflow.api.load_pretrained`.", ""]
    meta = DiffusionMeta.from_dict(info.meta)
    latents, classes = meta.latents, meta.num_classes
    labels = (f"labels = torch.arange(4) % {classes}  # class ids; id {classes} is the unconditional (null) "
              "label\n") if classes else ""
    use = _DIFFUSERS_USE.format(folder=folder, channels=latents.latent_channels, size=latents.latent_size,
                                labels=labels, label_arg="class_labels=labels" if classes else "",
                                scale=info.scale_factor)
    return ["## diffusers", "", f"This folder is a diffusers `{info.diffusers}`.", "", use]


def model_card(info: ExportInfo, folder: str = "PATH") -> str:
    """Markdown: what the folder holds, how to load it, the data facts, the audit's figures, the training config."""
    lines = [f"# {info.name} ({info.stage}, ldmflow)", "",
             f"Exported by ldmflow {info.ldmflow_version} from `{info.checkpoint}`", "",
             f"- checkpoint sha256: `{info.checkpoint_sha256}`",
             f"- weights: `{info.weights}` ({info.weight_names} parameter names, safetensors)",
             f"- latent scale factor: {info.scale_factor}",
             f"- intensity range: {json.dumps(info.intensity)}",
             f"- data fingerprint (sha256): `{info.data_fingerprint_sha256}`"]
    if info.autoencoder:
        lines.append(f"- autoencoder (decodes the latents): `{info.autoencoder}/`")
    lines += ["", "## ldmflow", "", "```python", "from ldmflow.api import load_pretrained", "",
              f'loaded = load_pretrained("{folder}")  # .model (eval mode), .config, .meta', "```", ""]
    if info.stage == "diffusion":
        lines += _diffusers_section(info, folder)
    lines += ["## Memorization audit", ""]
    if info.memorization:
        lines += ["```json", json.dumps(info.memorization, indent=2), "```", ""]
    else:
        lines += ["No audit summary was given to `ldmflow export --memorization`.", ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(info.config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
