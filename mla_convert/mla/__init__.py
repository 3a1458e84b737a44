"""The conversion math: rotary bookkeeping, the exact MLA form of an attention layer, factorization and
the latent norm. Pure tensor functions, no I/O."""
