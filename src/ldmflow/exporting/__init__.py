"""Exporting models others can load: diffusers folders, safetensors, model cards."""
