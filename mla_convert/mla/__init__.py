"""The conversion math: rotary bookkeeping, the exact MLA form of an attention layer, factorization, the
latent norm and its natural scale for training. Tensor functions with no I/O, importing nothing of the
package outside this folder. Open `exact.py` first.
"""
