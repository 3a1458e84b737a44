"""Plan: what will be written, decided before any weight is read.

Takes a `Source`'s config and the options; gives a `Plan` (profile, latent and rotary widths, the rotary
slot layout, dtype), the DeepSeek-V3 config it implies, which engines will serve it, and the dry run's
figures. Open `plan.py` first.
"""
