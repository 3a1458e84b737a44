"""Target profiles and fitting methods as objects: every rule that depends on `--target` or `--method` is
written here once, and the rest of the package asks the object instead of comparing names.

A profile decides what the written checkpoint relies on, and so who computes it right:
- portable: the plain rotary frequency ladder, no attention biases, only settings that transformers, vLLM,
  SGLang and llama.cpp compute identically (the default);
- transformers: per-dimension rotary frequencies (longrope factors) and the source's biases, exact at full
  size, which vLLM and SGLang load and then compute wrongly without an error.

Nothing here imports torch: the options check uses these rules before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError


@dataclass(frozen=True)
class Profile:
    """One `--target`: the rules a conversion for it follows."""

    name: str
    exact_rotary: bool  # every rotary component keeps its own frequency (per-dimension factors), not a ladder
    keeps_bias: bool  # q/k/v (and output) biases are written; engines' DeepSeek attention cannot hold them

    @property
    def ladder(self) -> bool:
        """The rotary key is a frequency ladder (rope_theta and its width decide every slot's frequency)."""
        return not self.exact_rotary

    @property
    def engines_compute_it(self) -> bool:
        """vLLM, SGLang and llama.cpp compute the written checkpoint as transformers does."""
        return not self.exact_rotary and not self.keeps_bias

    def keep_bias(self, source_has_bias: bool) -> bool:
        return source_has_bias and self.keeps_bias

    def max_rope(self, rotary_dim: int, kv_heads: int, density: int = 1) -> int:
        """The widest rotary key that still means something: a ladder holds each source frequency `density`
        times; exact rotary holds every component of every KV head."""
        return density * rotary_dim if self.ladder else kv_heads * rotary_dim

    def refuse_gguf(self) -> None:
        if not self.engines_compute_it:
            raise ConversionError(
                "--gguf needs --target portable: llama.cpp computes the portable profile only; "
                f"drop --target {self.name}"
            )

    def refuse_engine(self, engine: str) -> None:
        if not self.engines_compute_it:
            raise ConversionError(
                f"--engine {engine} needs --target portable: vLLM replaces the {self.name} profile's rotary "
                f"frequencies and drops its biases; to resolve, drop --target {self.name}"
            )

    def warnings(self, source_has_bias: bool, multipliers: bool) -> list[str]:
        """What the profile costs or restricts, said in the plan, the report and the card."""
        out = []
        if source_has_bias and not self.keeps_bias:
            out.append(
                f"the source has {'attention' if multipliers else 'q/k/v'} biases, which serving engines' "
                f"DeepSeek attention cannot hold; the {self.name} profile drops them (use --target transformers "
                "for an exact map)"
            )
        if not self.engines_compute_it:
            out.append(
                f"--target {self.name} uses per-dimension rotary frequencies"
                + (" and attention biases" if self.keep_bias(source_has_bias) else "")
                + "; vLLM and SGLang load it but compute it wrongly: serve only with transformers"
            )
        return out


PORTABLE = Profile("portable", exact_rotary=False, keeps_bias=False)
TRANSFORMERS = Profile("transformers", exact_rotary=True, keeps_bias=True)
PROFILES = {p.name: p for p in (PORTABLE, TRANSFORMERS)}


@dataclass(frozen=True)
class EngineWidths:
    """One `--engine`: the cache widths its kernels run, written whatever the budget (real latent components
    up to --kv-rank or the lossless rank, zeros beyond)."""

    name: str
    label: str
    latent: int
    rope: int

    @property
    def width(self) -> int:
        return self.latent + self.rope

    @property
    def layout(self) -> str:
        return f"latent {self.latent} + rotary {self.rope}, the layout {self.label}'s MLA kernels run"

    def refuse(self, target: str, kv_rank: int | None, rope_dim: int | None) -> None:
        """The flags that contradict these widths, refused before any work."""
        profile(target).refuse_engine(self.name)
        if rope_dim is not None and rope_dim != self.rope:
            raise ConversionError(
                f"--engine {self.name} fixes the rotary key at {self.rope} ({self.layout}), got --rope-dim "
                f"{rope_dim}; to resolve, drop --rope-dim"
            )
        if kv_rank is not None and kv_rank > self.latent:
            raise ConversionError(
                f"--kv-rank {kv_rank} does not fit the {self.latent}-wide latent of --engine {self.name} "
                f"({self.layout})"
            )


VLLM = EngineWidths("vllm", "vLLM", latent=512, rope=64)  # DeepSeek's own widths: every vLLM MLA backend runs them
ENGINE_WIDTHS = {e.name: e for e in (VLLM,)}


@dataclass(frozen=True)
class Method:
    """One `--method`: how the latent (and the rotary mixing) is fitted."""

    name: str
    fits_activations: bool  # fitted to calibration activations (reads text); else data-free on the weights
    data_free_reason: str = ""  # why --calib-data goes unused with it


ACTIVATION = Method("activation", fits_activations=True)
SVD = Method("svd", fits_activations=False, data_free_reason="--method svd is data-free")
METHOD_RULES = {m.name: m for m in (ACTIVATION, SVD)}


def profile(name: str) -> Profile:
    """The profile of a checked `--target`."""
    return PROFILES[name]


def method(name: str) -> Method:
    """The method of a checked `--method`."""
    return METHOD_RULES[name]
