"""Where a data-free conversion spends its time, per decoder layer, on a synthetic 7B-shaped checkpoint.

    python bench/profile_layer.py --size 7B-4L

Writes the checkpoint (bench/scaling.py's shapes), converts it in this process under cProfile with the
same flags as the scaling bench, and prints the cumulative seconds per layer of the steps that matter:
reading tensors, the rotary rewrite (mla_form), the latent factorization (Gram matrix and its
eigendecomposition), laying out the DeepSeek tensors, rescaling, and handing tensors to the writer (which
waits when the background writes fall more than 128 MiB behind). The page cache is warm, unlike in
bench/scaling.py.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scaling import CONVERT, shape_of, write_checkpoint

STEPS = {
    "read tensors (TensorFile.get)": ("safetensors_io.py", "get"),
    "rotary rewrite (mla_form)": ("exact.py", "mla_form"),
    "latent factorization (weight_svd)": ("factorize.py", "weight_svd"),
    "  of which the eigendecomposition (eigh)": ("~", "linalg_eigh"),
    "DeepSeek layout (attention_tensors)": ("layout.py", "attention_tensors"),
    "residual rescale (scaled)": ("driver.py", "scaled"),
    "hand to the writer (ShardWriter.add)": ("writer.py", "add"),
    "whole layer (layer_tensors)": ("driver.py", "layer_tensors"),
}


def _named(name: str, func: str, file: str) -> bool:
    """Python functions match by name; built-ins (file "~") by a part of their description."""
    return func in name if file == "~" else name == func


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7B-4L")
    args = parser.parse_args()
    shape = shape_of(args.size)
    work = Path(tempfile.mkdtemp(prefix="mla-profile-"))
    try:
        write_checkpoint(work / "src", shape)
        os.sync()  # else flushing the checkpoint just written slows the conversion's own writes
        from mla_convert.cli import app

        profile = cProfile.Profile()
        profile.enable()
        try:
            app([str(work / "src"), str(work / "out"), *CONVERT], standalone_mode=False)
        finally:
            profile.disable()
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        layers = shape["layers"]
        print(f"{args.size}: seconds per layer ({layers} layers), cumulative over the run / layers")
        for label, (file, func) in STEPS.items():
            total = sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file) and _named(name, func, file))
            print(f"  {label:44s} {total / layers:6.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
