"""Utilities any stage may use, which import nothing of the package: memory (`resources.py`), safetensors
read and written one tensor at a time (`safetensors_io.py`), byte units, the transformers version shims and
the tool's version."""
