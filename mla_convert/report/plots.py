"""PNG plots written beside the checkpoint: the training loss curve and per-layer reconstruction error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_PLOT = "training_loss.png"
LAYER_PLOT = "layer_error.png"
LONG_PLOT = "long_context.png"


def draw(
    out_dir: Path,
    layers: list[dict[str, Any]],
    long_eval: dict[str, Any] | None,
    losses: list[float] | None,
    resumed_from: int | None,
) -> list[str]:
    """Draw the loss curve (after a fine-tune), the per-layer errors and the long-context curves; returns the
    file names drawn (the report's `plots`)."""
    drawn = []
    if losses:
        loss_curve(out_dir / LOSS_PLOT, losses, resumed_from)
        drawn.append(LOSS_PLOT)
    layer_errors(out_dir / LAYER_PLOT, layers)
    drawn.append(LAYER_PLOT)
    if long_eval and (long_eval.get("buckets") or long_eval.get("passkey")):
        long_context(out_dir / LONG_PLOT, long_eval)
        drawn.append(LONG_PLOT)
    return drawn


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def loss_curve(path: Path, losses: list[float], resumed_from: int | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2, color="#2060a0")
    if resumed_from:
        ax.axvline(resumed_from, color="grey", ls="--", lw=0.8, label=f"resumed after step {resumed_from}")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation loss (nats / token)")
    ax.set_yscale("log")
    ax.set_title("Fine-tune loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version/date stamp: same run, same bytes
    plt.close(fig)


def layer_errors(path: Path, layers: list[dict[str, Any]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    index = [layer["index"] for layer in layers]
    series = [
        ("k_rel_error", "K (weights)"),
        ("v_rel_error", "V (weights)"),
        ("k_act_error", "K (activations)"),
        ("v_act_error", "V (activations)"),
        ("attn_output_error", "attention output"),
    ]
    for key, label in series:
        values = [layer.get(key) for layer in layers]
        if all(v is not None for v in values):
            ax.plot(index, [max(v, 1e-12) for v in values], marker=".", lw=1, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.set_yscale("log")
    ax.set_title("Per-layer reconstruction error of the conversion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def long_context(path: Path, long: dict[str, Any]) -> None:
    """Perplexity ratio to the source by position (left) and passkey accuracy by prompt length (right)."""
    plt = _pyplot()
    fig, (by_pos, keys) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    buckets = long.get("buckets") or []
    if buckets:
        middles = [(b["start"] + b["end"]) / 2 for b in buckets]
        by_pos.axhline(1.0, color="black", lw=0.8, label="source")
        for name in buckets[0]["models"]:
            by_pos.plot(middles, [b["models"][name]["perplexity_ratio"] for b in buckets], marker="o", label=name)
        by_pos.set_xscale("log")
        by_pos.set_xticks(middles, [f"{b['start']}-{b['end']}" for b in buckets], rotation=20, fontsize=7)
        by_pos.minorticks_off()
        by_pos.legend()
    by_pos.set_xlabel("position in the window (tokens)")
    by_pos.set_ylabel("perplexity ratio to the source")
    by_pos.set_title(f"Quality by position ({long['windows']} x {long['length']} tokens)")
    by_pos.grid(alpha=0.3)
    passkey = long.get("passkey")
    if passkey:
        lengths = passkey["lengths"]
        for name, correct in passkey["correct"].items():
            keys.plot(lengths, [c / passkey["trials"] for c in correct], marker="o", label=name)
        keys.set_xscale("log", base=2)
        keys.set_xticks(lengths, [str(n) for n in lengths])
        keys.minorticks_off()
        keys.set_ylim(-0.05, 1.05)
        keys.legend()
    keys.set_xlabel("prompt length (tokens)")
    keys.set_ylabel("passkey accuracy")
    keys.set_title("Passkey retrieval")
    keys.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
