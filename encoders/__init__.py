"""Encoders: voxelization, DINOv2 features, back-projection, sparse attention and the SLAT VAE encoder.

Heavy modules (torch, transformers) are imported by their own module only; import what you use from there.
"""

__all__: list[str] = []
