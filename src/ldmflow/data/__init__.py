"""The data layer: manifests and image folders, the demo dataset, control signals, the latent store's format.

Data loads no model."""
