"""Artifact metadata: typed, versioned, written and read in one module; checkpoints and stores made before the
version field existed (tests/data/legacy_v0, made by tests/data/legacy_v0/make.py) still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldmflow.checkpoints import load_autoencoder, load_controlnet, load_diffusion, verified_autoencoder
from ldmflow.data.latent_store import LatentStore
from ldmflow.diffusion.generate import decode_latents, generate, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.metadata import (
    METADATA_VERSION,
    ControlNetMeta,
    DiffusionMeta,
    LatentsInfo,
    MetadataError,
    StoreAttrs,
)

LEGACY = Path(__file__).parent / "data" / "legacy_v0"


def test_a_legacy_diffusion_checkpoint_loads_as_version_0_and_samples_with_its_autoencoder():
    state = torch.load(LEGACY / "diffusion.pt", weights_only=True)
    assert "version" not in state["extra"]  # what main wrote before the field existed
    loaded = load_diffusion(LEGACY / "diffusion.pt")
    meta = loaded.meta
    assert isinstance(meta, DiffusionMeta) and meta.num_classes == 3
    assert meta.latents.classes == ["circle", "square", "triangle"] and meta.latents.latent_shape == (4, 4, 4)
    # the recorded autoencoder path is the maker's temporary folder: a moved copy is accepted by sha256
    decoder = verified_autoencoder(meta.latents, "cpu", path=LEGACY / "autoencoder.pt").model
    noise, gen = seeded_noise(2, meta.latents.latent_shape, seed=0, device="cpu")
    z = generate(loaded.model, NoiseSchedule.from_config(loaded.config.diffusion), noise,
                 labels=torch.tensor([0, 2]), sampling=loaded.config.sampling,
                 prediction=loaded.config.diffusion.prediction, generator=gen)
    _, pixels = decode_latents(decoder, z, meta.latents.scale_factor)
    assert pixels.shape == (2, 16, 16, 3)


def test_a_legacy_controlnet_checkpoint_loads_with_its_base_and_control_fields():
    loaded = load_controlnet(LEGACY / "controlnet.pt")
    meta = loaded.meta
    assert isinstance(meta, ControlNetMeta)
    assert (meta.signal, meta.control_channels, meta.downsample, meta.image_size) == ("mask", 4, 4, 16)
    assert loaded.base_config.name == "legacy_diffusion" and meta.latents.mask_classes == 4


def test_a_legacy_autoencoder_checkpoint_and_latent_store_load():
    loaded = load_autoencoder(LEGACY / "autoencoder.pt")
    assert loaded.config.name == "legacy_ae" and loaded.meta.manifest_sha256
    store = LatentStore(LEGACY / "latents.zarr")
    assert isinstance(store.info, StoreAttrs) and store.info.autoencoder.name == "legacy_ae"
    assert store.n == 16 and store.info.intensity == {"range": None, "source_bits": 8}


def test_metadata_round_trips_with_the_current_version():
    store = LatentStore(LEGACY / "latents.zarr")
    info = LatentsInfo.of_store(str(store.path), store.info)
    meta = DiffusionMeta(latents=info, num_classes=3)
    written = meta.to_dict()
    assert written["version"] == METADATA_VERSION and "init" not in written and written["num_classes"] == 3
    assert DiffusionMeta.from_dict(written) == meta
    assert StoreAttrs.from_dict(store.info.to_dict()) == store.info


def test_metadata_missing_a_field_is_one_line_saying_how_to_convert(tmp_path):
    state = torch.load(LEGACY / "diffusion.pt", weights_only=True)
    del state["extra"]["autoencoder_sha256"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(MetadataError, match=r"lacks autoencoder_sha256; retrain it, or convert it") as err:
        load_diffusion(tmp_path / "old.pt")
    assert "\n" not in str(err.value)


def test_metadata_of_a_newer_version_is_refused(tmp_path):
    state = torch.load(LEGACY / "diffusion.pt", weights_only=True)
    state["extra"]["version"] = METADATA_VERSION + 1
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(MetadataError, match="newer than this ldmflow reads"):
        load_diffusion(tmp_path / "new.pt")


def test_a_moved_legacy_store_still_names_its_autoencoder(tmp_path):
    shutil.copytree(LEGACY / "latents.zarr", tmp_path / "latents.zarr")
    store = LatentStore(tmp_path / "latents.zarr")
    assert store.check_autoencoder(LEGACY / "autoencoder.pt") == LEGACY / "autoencoder.pt"
