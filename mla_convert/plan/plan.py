"""The conversion plan: target profile, latent and rotary widths, slot layout, dtype.

Everything here is decided from the config and the flags (plus cheap key-weight energies for the
transformers profile) and validated before any heavy work, so bad flags fail in a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import ConversionError
from ..mla.exact import Slot
from ..mla.latent_norm import LATENT_NORM_EPS
from ..mla.rotary import ladder, match_ladder, near_slots, portable_theta, source_inv_freq
from ..options import Options
from ..profiles import ENGINE_WIDTHS, Profile, profile
from ..source.families import (
    Experts,
    Family,
    experts_of,
    family_for,
    has_qkv_bias,
    head_dim_of,
    rotary_factor,
    sliding_window,
)

# The smallest budget docs/results.md measured, and what it gave: below it a setting is unmeasured.
MEASURED_FLOOR = 0.125
MEASURED_FLOOR_RESULT = "SmolLM2-135M one-shot reached 31.8x the source perplexity"
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Geometry:
    """The shapes and settings of the source that the conversion depends on."""

    arch: str
    family: Family
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    qkv_bias: bool
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    tied: bool
    rotary_dim: int  # dimensions of each head that rotate (head_dim; Phi-4-mini: 3/4 of it)
    intermediate: int = 0  # the dense MLP's width (a MoE source's leading dense layers)
    experts: Experts | None = None  # a MoE source's routing; None for a dense source

    @property
    def target_class(self) -> str:
        """The stock class written (docs/method.md, "Source families").

        A MoE source is written as DeepSeek-V2, whose router keeps a softmax's top k as OLMoE's does (exact),
        and picks the same experts as a renormalized one (Mixtral, Qwen3-MoE; approximate weights, mla/routing.py).
        A dense source is written as DeepSeek-V3, whose router it never uses.
        """
        return "DeepseekV2ForCausalLM" if self.experts else "DeepseekV3ForCausalLM"

    @property
    def kv_elements(self) -> int:
        """KV cache elements per token per layer of the source (K and V of every KV head)."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Plan:
    """What the conversion does; frozen: a choice made later (the measured split) is a new plan (`replace`)."""

    target: str
    geometry: Geometry
    rope_dim: int
    rope_theta: float
    kv_rank: int
    full_kv_rank: int
    slots: list[Slot]
    slot_inv_freq: torch.Tensor  # float64 frequency of each slot (ladder value for empty portable slots)
    dtype: torch.dtype
    keep_bias: bool
    q_scale: float
    residual_scale: float
    split_reason: str
    warnings: list[str] = field(default_factory=list)
    method: str = "svd"  # "svd": data-free weight SVD; "activation": fitted on calibration activations
    stride: int = 1  # portable: the ladder holds every stride-th source frequency
    density: int = 1  # portable: ladder slots per source frequency (the extra ones hold near components)
    engine: str | None = None  # --engine: the widths are the ones that engine's kernels run
    latent_width: int = 0  # kv_lora_rank as written: kv_rank real components, zeros beyond (0: kv_rank)

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_width", max(self.latent_width, self.kv_rank))

    @property
    def kv_elements(self) -> int:
        """Cache elements per token per layer as the engines hold them (padding included)."""
        return self.latent_width + self.rope_dim

    def kv_bytes_per_token(self) -> tuple[int, int]:
        """KV cache bytes per token over all layers at the output dtype, (source, converted)."""
        per_layer = self.dtype.itemsize * self.geometry.layers
        return self.geometry.kv_elements * per_layer, self.kv_elements * per_layer

    @property
    def profile(self) -> Profile:
        """The rules of this plan's target profile."""
        return profile(self.target)

    @property
    def nope_dim(self) -> int:
        return self.geometry.head_dim

    @property
    def compressed(self) -> bool:
        return self.kv_rank < self.full_kv_rank


def geometry_of(config: Any, allow_full_attention: bool = False) -> Geometry:
    family = family_for(config, allow_full_attention)
    heads = config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    head_dim = head_dim_of(config)
    return Geometry(
        arch=(getattr(config, "architectures", None) or [config.model_type])[0],
        family=family,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        qkv_bias=has_qkv_bias(family, config),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        rope_type=rope.get("rope_type", "default"),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        rotary_dim=int(head_dim * rotary_factor(config)),
        intermediate=int(config.intermediate_size),
        experts=experts_of(family, config),
    )


def family_warnings(geo: Geometry) -> list[str]:
    """What a family's conversion approximates at every width, said in the plan, dry run, report and card."""
    out = []
    if geo.family.qk_norm:
        span = "each head's" if geo.family.qk_norm_heads else "all heads'"
        out.append(
            f"{geo.arch} normalizes {span} queries and keys (q_norm, k_norm), which DeepSeek-V3 cannot "
            "express: each norm becomes a fixed per-head scale measured on calibration text, so the conversion is "
            "approximate at every width, --target transformers included; the report gives each layer's attention "
            "output error"
        )
    experts = geo.experts
    if experts is not None and experts.renormalize:
        out.append(
            f"{geo.arch} weights its top-{experts.top_k} experts by a renormalized softmax, which no stock class "
            "with MLA computes in every engine: DeepSeek-V2's router picks the same experts and weights them by "
            "the softmax itself, times one factor per layer fitted on calibration text (on the norm's gains "
            "without it), so the expert mix is approximate; the report gives each layer's output error and the "
            "routing agreement"
        )
    return out


KeyEnergy = Callable[[Geometry, bool, torch.dtype], torch.Tensor]  # (geometry, keep_bias, dtype) -> energies


def plan_for(
    config: Any, options: Options, key_energy: KeyEnergy | None = None, stride: int = 1, density: int = 1
) -> Plan:
    """The plan for these (checked) options. key_energy reads the weights (conversion/driver.py key_energies),
    for the transformers profile's choice of rotary components; it is called only when there is a choice."""
    geo = geometry_of(config, options.allow_full_attention)
    keep_bias = profile(options.target).keep_bias(geo.qkv_bias)
    energy = None
    if key_energy is not None:
        energy = lambda: key_energy(geo, keep_bias, resolve_dtype(options.dtype, config))  # noqa: E731
    plan = make_plan(
        config,
        target=options.target,
        kv_rank=options.kv_rank,
        rope_dim=options.rope_dim,
        kv_budget=options.kv_budget,
        dtype=options.dtype,
        stride=stride,
        density=density,
        key_energy=energy,
        engine=options.engine,
        allow_full_attention=options.allow_full_attention,
    )
    return replace(plan, method=options.method)


def structurally_lossless(plan: Plan) -> bool:
    """Nothing to approximate: every rotary component has a slot, the latent has full rank, and the family has
    nothing DeepSeek-V3 lacks (Qwen3's per-head q/k norms, a renormalized expert router)."""
    geo, rules = plan.geometry, plan.profile
    every_component = rules.exact_rotary and plan.rope_dim == geo.kv_heads * geo.rotary_dim
    single_head = rules.ladder and geo.kv_heads == 1 and all(s is not None for s in plan.slots)
    exact_family = not geo.family.qk_norm and not (geo.experts is not None and geo.experts.renormalize)
    return not plan.compressed and exact_family and (every_component or single_head)


def make_plan(
    config: Any,
    *,
    target: str = "portable",
    kv_rank: int | None = None,
    rope_dim: int | None = None,
    kv_budget: float | None = None,
    dtype: str = "auto",
    stride: int = 1,
    key_energy: Callable[[], torch.Tensor] | None = None,
    engine: str | None = None,
    rope_padding: bool = False,
    density: int = 1,
    allow_full_attention: bool = False,
) -> Plan:
    """Decide the conversion.

    key_energy is called, only when the transformers profile must choose among rotary components, for
    the [layers, freqs, kv_heads] energies of the mixed key components. With an engine the widths are
    that engine's; kv_rank (or the budget) then decides how many latent components are real.
    rope_padding lets a portable rotary key be wider than head_dim: the extra ladder slots stay empty.
    allow_full_attention converts a sliding-window source to full attention (with a warning) instead of refusing it.
    density > 1 (portable, stride 1) puts density slots on each source frequency step: the first holds
    the frequency exactly, the others further mixed components at a near frequency (up to density*head_dim).
    """
    geo = geometry_of(config, allow_full_attention)
    if engine is not None:
        return _engine_plan(
            config, geo, engine, target, kv_rank, rope_dim, kv_budget, dtype, stride, density, allow_full_attention
        )
    rules = profile(target)
    density = _ladder_density(rules, geo, rope_dim, stride, density, rope_padding)
    max_rope = rules.max_rope(geo.rotary_dim, geo.kv_heads, density)
    warnings = family_warnings(geo) + _window_warnings(config)
    if rope_dim is not None:
        _check_rope_dim(rope_dim, max_rope if not rope_padding else max(max_rope, rope_dim), target)
    if kv_budget is not None:
        rope_dim, kv_rank, split_reason = _budget_split(rules, geo, kv_budget, max_rope)
    else:
        split_reason = "ranks given on the command line" if kv_rank or rope_dim else "full size (lossless map)"
    if rope_dim is None:
        rope_dim = max_rope
    inv_freq, rope_scaling = source_inv_freq(config, geo.rotary_dim)
    theta, slots, slot_freq, empty = _rotary_slots(
        rules, geo, inv_freq, rope_dim, stride, density, rope_padding, key_energy
    )
    warnings += empty
    full_kv_rank = _lossless_rank(rules, geo, slots)
    if kv_rank is None:
        kv_rank = full_kv_rank
    if kv_rank < 1 or kv_rank > full_kv_rank:
        raise ConversionError(
            f"--kv-rank must be between 1 and {full_kv_rank} (the lossless latent width for this model and "
            f"rope width), got {kv_rank}"
        )
    fraction = (kv_rank + rope_dim) / geo.kv_elements
    if kv_rank < full_kv_rank and fraction < MEASURED_FLOOR:
        warnings.append(
            f"a {kv_rank + rope_dim}-element cache is {fraction:.3f} of the source's, below the smallest budget the "
            f"benchmarks measured ({MEASURED_FLOOR}: {MEASURED_FLOOR_RESULT}); expect a much worse model"
        )
    warnings += rules.warnings(geo.qkv_bias, geo.family.multipliers)
    source_scale = geo.head_dim**-0.5 * rope_scaling**2
    target_scale = (geo.head_dim + rope_dim) ** -0.5
    return Plan(
        target=target,
        geometry=geo,
        rope_dim=rope_dim,
        rope_theta=theta,
        kv_rank=kv_rank,
        full_kv_rank=full_kv_rank,
        slots=slots,
        slot_inv_freq=slot_freq,
        dtype=resolve_dtype(dtype, config),
        keep_bias=rules.keep_bias(geo.qkv_bias),
        q_scale=source_scale / target_scale,
        residual_scale=math.sqrt(LATENT_NORM_EPS / geo.rms_norm_eps),
        split_reason=split_reason,
        warnings=warnings,
        stride=stride if rules.ladder else 1,
        density=density,
        engine=engine,
    )


def _ladder_density(
    rules: Profile, geo: Geometry, rope_dim: int | None, stride: int, density: int, rope_padding: bool
) -> int:
    """Slots per source frequency: a portable rotary key wider than the rotating head width is a dense ladder.

    d is the rotating width of a head (head_dim unless the source rotates only part of it; the rest of the
    head never rotates and rides in the latent exactly)."""
    d, kv = geo.rotary_dim, geo.kv_heads
    if d % 2 or geo.head_dim % 2:
        raise ConversionError(f"head_dim {geo.head_dim} (rotating {d}) is odd; RoPE needs an even head dimension")
    if rules.ladder and rope_dim is not None and rope_dim > d and density == 1 and not rope_padding:
        density = -(-rope_dim // d)
        if density > kv:
            raise ConversionError(
                f"--rope-dim {rope_dim} is wider than the portable profile can fill: at most {kv * d} ({kv} KV heads "
                f"of {d}, each source frequency holding up to {kv} components)"
            )
        if stride != 1:
            raise ConversionError(f"a rotary key of {rope_dim} (wider than head_dim {d}) needs ladder stride 1")
    if density < 1 or (density > 1 and (not rules.ladder or stride != 1 or density > kv)):
        raise ConversionError(f"internal: a rotary ladder of density {density} needs the portable profile, stride 1")
    return density


def _window_warnings(config: Any) -> list[str]:
    window = sliding_window(config)
    if window is None:
        return []
    return [
        f"--allow-full-attention: the source attends to the last {window} tokens only, the converted model to "
        f"all earlier tokens; the two compute the same on contexts up to {window} tokens and differ beyond"
    ]


def _budget_split(rules: Profile, geo: Geometry, kv_budget: float, max_rope: int) -> tuple[int, int, str]:
    """The data-free split of a budget: a third to the rotary key (even, at most max_rope), the rest to the
    latent; the lossless map when the budget covers it. The measured split (split.py) may replace it."""
    total = math.floor(kv_budget * geo.kv_elements)
    lossless_latent = min(geo.kv_elements - max_rope, geo.hidden + int(rules.keep_bias(geo.qkv_bias)))
    if total >= max_rope + lossless_latent:
        rope_dim, kv_rank = max_rope, lossless_latent
    else:
        rope_dim = min(max_rope, max(2, 2 * (total // 6)))
        kv_rank = total - rope_dim
    if kv_rank < 1:
        raise ConversionError(
            f"--kv-budget {kv_budget} leaves {total} cache elements per token, too few for a rotary key "
            f"and a latent; the smallest usable budget is {3 / geo.kv_elements:.4f}"
        )
    reason = f"budget {kv_budget} of {geo.kv_elements} = {total} elements: " + (
        "enough for the lossless map"
        if rope_dim == max_rope and kv_rank == lossless_latent
        else f"rope {rope_dim} (a third, even, at most {max_rope}), latent {kv_rank}"
    )
    return rope_dim, kv_rank, reason


def _rotary_slots(
    rules: Profile,
    geo: Geometry,
    inv_freq: torch.Tensor,
    rope_dim: int,
    stride: int,
    density: int,
    rope_padding: bool,
    key_energy: Callable[[], torch.Tensor] | None,
) -> tuple[float, list[Slot], torch.Tensor, list[str]]:
    """The rotary key's theta, which source component each slot holds, the slots' frequencies, and a warning
    when ladder slots meant to hold a source frequency match none."""
    d = geo.rotary_dim
    if not rules.ladder:
        slots = _best_components(inv_freq, geo.kv_heads, rope_dim // 2, key_energy)
        return geo.rope_theta, slots, torch.stack([inv_freq[i] for i, _ in slots]), []  # type: ignore[misc]
    padded = rope_padding and rope_dim > d and stride == 1 and density == 1
    if stride < 1 or ((rope_dim // 2 - 1) // density * stride > d // 2 - 1 and not padded):
        raise ConversionError(
            f"a rotary ladder of {rope_dim // 2} frequencies at stride {stride} overruns the source's {d // 2}"
        )
    theta = portable_theta(geo.rope_theta, rope_dim, d, stride, density)
    slot_freq = ladder(rope_dim, theta)
    slots: list[Slot] = list(near_slots(match_ladder(slot_freq, inv_freq), density, d // 2))
    # only a slot meant to hold a source frequency exactly can lose one; the others are padding
    empty = sum(1 for s in slots[: density * d // 2 : density] if s is None)
    warning = (
        f"{empty} of {len(slots)} rotary slots match no source frequency (rope type '{geo.rope_type}'); "
        "those source frequencies lose their rotation"
    )
    return theta, slots, slot_freq, [warning] if empty else []


def _lossless_rank(rules: Profile, geo: Geometry, slots: list[Slot]) -> int:
    """The latent width that loses nothing: every key and value element no rotary slot holds, at most the
    hidden size (plus one for a kept bias)."""
    held = sum(1 for s in slots if s is not None)
    return min(geo.kv_elements - 2 * held, geo.hidden + int(rules.keep_bias(geo.qkv_bias)))


def _engine_plan(
    config: Any,
    geo: Geometry,
    engine: str,
    target: str,
    kv_rank: int | None,
    rope_dim: int | None,
    kv_budget: float | None,
    dtype: str,
    stride: int,
    density: int = 1,
    allow_full_attention: bool = False,
) -> Plan:
    """Widths an engine's kernels run (vLLM: latent 512 + rotary 64), the latent holding as many real
    components as the source has (up to 512) or as kv_rank says, zeros beyond."""
    widths = ENGINE_WIDTHS[engine]
    width, layout = widths.width, widths.layout
    if kv_budget is not None:
        allowed = math.floor(kv_budget * geo.kv_elements)
        if allowed < width:
            raise ConversionError(
                f"--engine {engine} holds {width} cache elements per token per layer ({layout}), but --kv-budget "
                f"{kv_budget} allows {allowed} of this model's {geo.kv_elements}; to resolve, drop --kv-budget "
                f"(the {widths.label} cache is then {width / geo.kv_elements:.2f}x the source's) or drop --engine "
                f"{engine}"
            )
    fixed = {
        "target": target,
        "rope_dim": widths.rope,
        "dtype": dtype,
        "stride": stride,
        "rope_padding": True,
        "density": density,
        "allow_full_attention": allow_full_attention,
    }
    if kv_rank is None:  # every real component the fixed rotary key leaves, up to the latent's width
        rules = profile(target)
        dense = _ladder_density(rules, geo, widths.rope, stride, density, True)
        inv_freq, _ = source_inv_freq(config, geo.rotary_dim)
        slots = _rotary_slots(rules, geo, inv_freq, widths.rope, stride, dense, True, None)[1]
        kv_rank = min(_lossless_rank(rules, geo, slots), widths.latent)
    plan = make_plan(config, kv_rank=kv_rank, **fixed)
    real = f"{plan.kv_rank} real latent components" + (
        f" (lossless {plan.full_kv_rank})" if plan.compressed else " (lossless)"
    )
    reason = f"--engine {engine}: {layout}; {real}" + (
        f", {widths.latent - plan.kv_rank} zero" if plan.kv_rank < widths.latent else ""
    )
    warnings = list(plan.warnings)
    if width > geo.kv_elements:
        warnings.append(
            f"--engine {engine} holds {width} cache elements per token per layer, {width / geo.kv_elements:.2f}x "
            f"this model's {geo.kv_elements}: in {widths.label} it needs more KV cache than the source, not less"
        )
    return replace(plan, engine=engine, latent_width=widths.latent, split_reason=reason, warnings=warnings)


def _check_rope_dim(rope_dim: int, max_rope: int, target: str) -> None:
    if rope_dim > max_rope:
        raise ConversionError(
            f"--rope-dim {rope_dim} is larger than the lossless width {max_rope} for --target {target}"
        )


def _best_components(
    inv_freq: torch.Tensor, kv_heads: int, count: int, key_energy: Callable[[], torch.Tensor] | None
) -> list[Slot]:
    """Pick `count` (frequency, component) pairs for the transformers profile, fastest first within ties.

    With every slot available all components are kept; otherwise components are ranked by their key
    energy summed over layers, weighted by how far they rotate within 64 tokens (slow frequencies lose
    little when they stop rotating).
    """
    freqs = inv_freq.numel()
    candidates = [(i, m) for i in range(freqs) for m in range(kv_heads)]
    if count < len(candidates):
        if key_energy is None:
            raise ConversionError("internal: key energies are needed to choose rotary components")
        weight = key_energy().sum(0) * torch.clamp(inv_freq[:, None] * 64.0, max=1.0)
        candidates.sort(key=lambda c: -float(weight[c]))
        candidates = candidates[:count]
    return sorted(candidates, key=lambda c: (-float(inv_freq[c[0]]), c[1]))


def resolve_dtype(dtype: str, config: Any) -> torch.dtype:
    if dtype == "auto":
        src = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(src, str):
            src = DTYPE_BY_NAME.get(src, torch.float32)
        resolved = src if isinstance(src, torch.dtype) else torch.float32
        return torch.bfloat16 if resolved == torch.float16 else resolved
    return DTYPE_BY_NAME[dtype]  # float16 and unknown names were refused by check_options
