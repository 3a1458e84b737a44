"""Byte counts as people read them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units up to GiB, whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
