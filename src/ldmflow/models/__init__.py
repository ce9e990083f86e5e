"""Model families, one per file: the autoencoder, the diffusion UNet, ControlNets; shared blocks in layers.py.

Models import neither training, data, stages nor evaluation."""
