"""Dense rotary ladders: several slots per source frequency, the extra ones holding further mixed key
components at a near frequency (portable profile), measured against the plain ladder."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import LlamaConfig

from mla_convert import Options, convert
from mla_convert.conversion.budget import score_candidates
from mla_convert.mla.rotary import near_slots, source_inv_freq
from mla_convert.plan.plan import make_plan, plan_for
from mla_convert.plan.split import full_size_candidates
from mla_convert.source.checkpoint import resolve

from .conftest import COMMON, build_tiny
from .helpers import SMOLLM2

# wide enough that the lossless latent is not capped by the hidden size, (2 * 4 - 1) * 32 = 224 <= 256, and
# with 16 frequencies, so neighbouring ones are as close as in real models (ratio 10000 ** (1 / 8) = 3.2)
WIDE = LlamaConfig(**{**COMMON, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32})


def test_near_slots_place_each_component_once_beside_its_frequency() -> None:
    freqs = 8
    for density in (2, 3):
        exact = [k // density if k % density == 0 else None for k in range(density * freqs)]
        slots = near_slots(exact, density, freqs)
        placed = [s for s in slots if s is not None]
        assert len(placed) == len(set(placed)), "a component is placed at most once"
        for k, slot in enumerate(slots):
            if k % density == 0:
                assert slot == (k // density, 0)  # the first component, at its own frequency
            elif slot is not None:
                j, r = slot
                assert 0 < r < density and (abs(k - density * j) < density or k == len(slots) - 1)  # one source step
        # every further component gets a near slot, but for the fastest frequency's last one (density 3),
        # which takes the spare slot past the slowest frequency
        assert set(placed) == {(j, r) for j in range(freqs) for r in range(density)}
        if density == 3:
            assert slots[-1] == (0, 2)


def test_a_dense_ladder_holds_every_source_frequency_exactly() -> None:
    d, kv = 32, 4
    source_freq, _ = source_inv_freq(WIDE, d)
    for density in (2, 3):
        plan = make_plan(WIDE, rope_dim=density * d, density=density)
        assert torch.allclose(plan.slot_inv_freq[::density], source_freq, rtol=1e-9)
        assert all(plan.slots[density * j] == (j, 0) for j in range(d // 2))
        assert plan.full_kv_rank == (2 * kv - density) * d  # each slot takes its component out of the latent
        assert not plan.warnings


def test_dense_ladders_cut_the_full_size_attention_error(tmp_path) -> None:
    """At full size the plain ladder leaves all but one mixed component per frequency without rotation;
    near slots give the next ones most of it back (attention output on the source's own activations)."""
    model = build_tiny(WIDE)
    for layer in model.model.layers:  # sharper attention than random weights give, as in trained models
        layer.self_attn.q_proj.weight.data *= 4
    model.save_pretrained(tmp_path / "wide")
    source = resolve(str(tmp_path / "wide"))
    options = Options(finetune_steps=0)

    def make(rope_dim: int, kv_rank: int, stride: int, density: int = 1):
        return plan_for(source.config, replace(options, rope_dim=rope_dim, kv_rank=kv_rank), None, stride, density)

    plan = plan_for(source.config, options)
    candidates = full_size_candidates(make, plan, 32, 4)
    assert [(c.rope_dim, c.kv_rank, c.density, c.compressed) for c in candidates] == [
        (32, 224, 1, False),
        (64, 192, 2, False),
        (96, 160, 3, False),
    ]
    ids = torch.randint(0, WIDE.vocab_size, (4, 64), generator=torch.Generator().manual_seed(5))
    errors = [scored.error for scored in score_candidates(source, candidates, ids)]
    # measured 0.076 / 0.070 / 0.061 here; SmolLM2's closer frequencies gain more (docs/results.md)
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.9 * errors[0], errors


def test_the_vllm_layout_can_hold_a_dense_ladder() -> None:
    """--engine vllm fixes the rotary key at 64; a denser ladder there is one of the measured candidates."""
    plan = make_plan(LlamaConfig(**SMOLLM2), engine="vllm", density=2)
    assert (plan.rope_dim, plan.latent_width, plan.density) == (64, 512, 2)
    assert plan.slots[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)] and plan.kv_rank == plan.full_kv_rank == 320


def test_the_report_and_card_say_how_much_rotary_energy_sits_on_near_slots(tmp_path) -> None:
    build_tiny(WIDE).save_pretrained(tmp_path / "wide")
    options = Options(method="svd", rope_dim=64, finetune_steps=0, validate=False, verify=False)
    report = convert(tmp_path / "wide", tmp_path / "out", options)
    assert report["settings"]["rotary_density"] == 2
    for layer in report["layers"]:
        assert 0 < layer["rope_energy_near"] < layer["rope_energy_kept"] <= 1 + 1e-9
    assert "on near-frequency slots, rotating slightly off" in (tmp_path / "out" / "README.md").read_text()
