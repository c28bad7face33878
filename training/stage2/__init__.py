"""NeAR Stage 2: lighting tokenizer, Intrinsic/Lighting Aware Decoders and relightable Gaussians."""
