"""NeAR Stage 1: LoRA rectified-flow fine-tuning of the TRELLIS SLAT flow model, (Z_s, image) -> LH-SLAT."""
