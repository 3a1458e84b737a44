"""Long context (issue 30): the bucket arithmetic, the passkey builder and its scoring, the long-context section of
every validation run (report, card, plot, dry run), and long calibration windows in the fit and the split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mla_convert import Options, convert, dry_run
from mla_convert.conversion.budget import score_candidates
from mla_convert.evaluate.long_context import (
    ANSWER_TOKENS,
    FILLER,
    PositionSums,
    by_position,
    passkey_answer,
    passkey_correct,
    passkey_depths,
    passkey_keys,
    passkey_prompt,
)
from mla_convert.plan.long_eval import bucket_edges, long_eval_plan, near_far, passkey_lengths
from mla_convert.plan.plan import plan_for
from mla_convert.plan.split import Scored, pick
from mla_convert.source.checkpoint import resolve
from mla_convert.source.text import text_sets

from .helpers import documents, write_jsonl, write_txt


def test_buckets_split_a_window_at_a_sixteenth_a_quarter_and_a_half() -> None:
    assert bucket_edges(8192) == [0, 512, 2048, 4096, 8192]
    assert bucket_edges(512) == [0, 32, 128, 256, 512]
    assert near_far(8192) == ((0, 2048), (4096, 8192))


def test_passkey_lengths_double_from_1k_up_to_the_context() -> None:
    assert passkey_lengths(8192) == (1024, 2048, 4096, 8192)
    assert passkey_lengths(6000) == (1024, 2048, 4096, 6000)
    assert passkey_lengths(512) == (512,)


def test_the_long_eval_plan_follows_the_mode_the_cap_and_the_context() -> None:
    assert long_eval_plan("off", None, 8192) is None
    quick = long_eval_plan("quick", None, 8192)
    assert quick is not None and (quick.length, quick.windows, quick.passkey_trials) == (4096, 1, 2)
    full = long_eval_plan("full", None, 8192)
    assert full is not None and (full.length, full.windows, full.passkey_lengths) == (8192, 4, (1024, 2048, 4096, 8192))
    capped = long_eval_plan("full", 2048, 8192)
    assert capped is not None and capped.length == 2048
    assert capped.tokens_per_model() == 4 * 2048 + 4 * (1024 + 2048)
    # a longer window costs more than its share: attention grows with the square of the length
    assert full.estimated_seconds(135_000_000, 17280, 2) > 2 * capped.estimated_seconds(135_000_000, 17280, 2)


def test_ratios_by_position_come_from_the_per_position_losses() -> None:
    length = 1024  # 1023 predictions; near = the first 256 positions, far = 512 onwards
    src = PositionSums(torch.ones(length - 1, dtype=torch.float64) * 2)  # summed over 2 windows: mean NLL 1.0
    nll = torch.ones(length - 1, dtype=torch.float64) * 2
    nll[512:] = 3.0  # mean NLL 1.5 at the far positions
    model = PositionSums(nll, torch.full((length - 1,), 0.2, dtype=torch.float64), torch.ones(length - 1))
    buckets, spans = by_position(src, {"converted": model}, count=2)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 64), (64, 256), (256, 512), (512, 1024)]
    assert buckets[0]["models"]["converted"]["perplexity_ratio"] == pytest.approx(1.0)
    assert buckets[-1]["models"]["converted"]["perplexity_ratio"] == pytest.approx(math.exp(0.5))
    assert buckets[-1]["models"]["converted"]["kl_to_source"] == pytest.approx(0.1)
    assert buckets[-1]["models"]["converted"]["top1_agreement"] == pytest.approx(0.5)
    s = spans["models"]["converted"]
    assert (s["near_ratio"], s["far_ratio"]) == (pytest.approx(1.0), pytest.approx(math.exp(0.5)))
    assert s["far_over_near"] == pytest.approx(math.exp(0.5))


def test_a_passkey_prompt_hides_the_key_at_its_depth_within_the_length(tokenizer: object) -> None:
    key = passkey_keys(1, seed=3)[0]
    assert len(key) == 5 and key.isdigit() and passkey_keys(1, seed=3) == [key]
    filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)  # type: ignore[operator]
    places = []
    for depth in passkey_depths(4):
        prompt = passkey_prompt(tokenizer, 512, depth, key)
        n = prompt.ids.numel()
        assert 512 - ANSWER_TOKENS - filler < n <= 512 - ANSWER_TOKENS
        text = tokenizer.decode(prompt.ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        assert text.count(f"The pass key is {key}.") == 1 and text.endswith("What is the pass key? The pass key is")
        places.append(text.index(key) / len(text))
    assert places == sorted(places) and places[-1] - places[0] > 0.5  # 1/8 to 7/8 of the filler, after the intro
    with pytest.raises(ValueError):
        passkey_prompt(tokenizer, 40, 0.5, key)


class _Answers:
    """A stand-in model whose greedy continuation is fixed text."""

    device = torch.device("cpu")

    def __init__(self, tokenizer: object, text: str) -> None:
        self.ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)  # type: ignore[operator]

    def generate(self, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.cat([ids, self.ids[None]], dim=1)


def test_a_passkey_counts_only_when_the_first_number_is_the_key(tokenizer: object) -> None:
    prompt = passkey_prompt(tokenizer, 512, 0.5, "48213")
    assert passkey_correct(_Answers(tokenizer, " 48213. Remember"), tokenizer, prompt)
    assert not passkey_correct(_Answers(tokenizer, " 12345, not 48213"), tokenizer, prompt)
    assert not passkey_correct(_Answers(tokenizer, " unknown"), tokenizer, prompt)
    assert passkey_answer("is 7 and 8") == "7" and passkey_answer("none") is None


def _long_run(text_model: Path, out: Path, **flags: object) -> dict:
    settings = {"kv_budget": 0.5, "calib_tokens": 1024, "calib_seq_len": 32, "eval_tokens": 256, "finetune_steps": 0}
    options = Options(**{**settings, **flags})  # type: ignore[arg-type]
    return convert(text_model, out, options)


def test_every_validation_reports_long_context_in_the_report_card_and_plot(text_model: Path, tmp_path: Path) -> None:
    """The tiny model's context is 512: quick measures one window of 512 by position and passkeys at 512."""
    calib = write_txt(tmp_path / "calib.txt", documents(120, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", documents(40, seed=2, per_doc=30))
    report = _long_run(text_model, tmp_path / "out", calib_data=str(calib), eval_data=str(evaluation))
    long = report["long_eval"]
    assert long["mode"] == "quick" and long["length"] == 512 and long["windows"] == 1
    assert [(b["start"], b["end"]) for b in long["buckets"]] == [(0, 32), (32, 128), (128, 256), (256, 512)]
    assert set(long["spans"]["models"]) == {"converted"}
    assert long["passkey"]["lengths"] == [512] and long["passkey"]["trials"] == 2
    assert set(long["passkey"]["correct"]) == {"source", "converted"}
    assert all(0 <= c <= 2 for counts in long["passkey"]["correct"].values() for c in counts)
    out = tmp_path / "out"
    assert "long_context.png" in report["plots"] and (out / "long_context.png").is_file()
    card = (out / "README.md").read_text()
    assert "## Long context" in card and "Passkey retrieval" in card and "| 256-512 |" in card
    assert json.loads((out / "mla_report.json").read_text())["long_eval"] == long


def test_documents_shorter_than_the_window_are_joined_and_the_report_says_so(text_model: Path, tmp_path: Path) -> None:
    calib = write_txt(tmp_path / "calib.txt", documents(120, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", documents(80, seed=2))  # 4 sentences: far below 512 tokens
    report = _long_run(text_model, tmp_path / "out", calib_data=str(calib), eval_data=str(evaluation))
    assert "its documents are joined" in report["long_eval"]["note"]
    assert report["long_eval"]["length"] == 512


def test_long_eval_off_writes_no_section_and_the_dry_run_gives_the_cost(text_model: Path, tmp_path: Path) -> None:
    report = _long_run(text_model, tmp_path / "out", long_eval="off", calib_tokens=512, eval_tokens=128)
    assert report["long_eval"] is None and "long_context.png" not in report["plots"]
    seen = dry_run(text_model, Options(kv_budget=0.5, long_eval="full", finetune_steps=0))
    cost = seen["long_eval"]
    assert (cost["mode"], cost["length"], cost["passkey_lengths"]) == ("full", 512, [512])
    assert cost["tokens_per_model"] == 4 * 512 + 4 * 512 and cost["estimated_cpu_seconds"] > 0
    assert dry_run(text_model, Options(kv_budget=0.5, long_eval="off"))["long_eval"] is None


def test_calibration_takes_long_windows_outside_the_held_out_tail(text_model: Path, tmp_path: Path) -> None:
    calib = write_txt(tmp_path / "calib.txt", documents(400, seed=4))
    source = resolve(str(text_model), False)
    texts = text_sets(
        source,
        calib_data=str(calib),
        calib_tokens=512,
        seq_len=32,
        eval_data=None,
        eval_tokens=512,
        column="text",
        seed=0,
        need_eval=True,
        calib_long_len=256,
        calib_long_windows=2,
    )
    assert texts.calib_long is not None and tuple(texts.calib_long.ids.shape) == (2, 256)
    assert texts.evaluation is not None and texts.evaluation.held_span is not None
    stream = texts.evaluation.held_span[0]  # the held-out tail starts here; long windows end before it
    tokens = source.tokenizer()(calib.read_text(), add_special_tokens=False).input_ids
    for window in texts.calib_long.ids:
        starts = [i for i in range(stream - 255) if tokens[i : i + 256] == window.tolist()]
        assert starts, "a long calibration window must come from before the held-out tail"


def test_a_split_that_wins_near_and_loses_far_loses_the_selection(text_model: Path) -> None:
    source = resolve(str(text_model), False)
    near_winner = plan_for(source.config, Options(kv_rank=24, rope_dim=8))
    far_winner = plan_for(source.config, Options(kv_rank=16, rope_dim=16))
    best, reason = pick([Scored(near_winner, 0.10, far_error=0.30), Scored(far_winner, 0.15, far_error=0.16)])
    assert best is far_winner and "far 0.3000" in reason and "ranked by the worse" in reason
    best, _ = pick([Scored(near_winner, 0.10), Scored(far_winner, 0.15)])
    assert best is near_winner  # without a long window, the near error alone decides, as before


def test_the_split_measurement_and_the_fit_score_far_positions(text_model: Path, tmp_path: Path) -> None:
    source = resolve(str(text_model), False)
    plans = [plan_for(source.config, Options(kv_rank=r, rope_dim=d)) for r, d in ((24, 8), (16, 16))]
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    long_ids = torch.randint(0, 300, (1, 256), generator=torch.Generator().manual_seed(1))
    scored = score_candidates(source, plans, ids, long_ids=long_ids)
    assert all(s.far_error is not None and 0 < s.far_error < 2 for s in scored)
    assert all(s.far_error is None for s in score_candidates(source, plans, ids))
    calib = write_txt(tmp_path / "calib.txt", documents(400, seed=4))
    report = _long_run(
        text_model, tmp_path / "out", calib_data=str(calib), calib_long_len=256, long_eval="off", eval_tokens=128
    )
    assert all(0 < layer["far_attn_output_error"] < 2 for layer in report["layers"])
    assert "far_attn_output_error_mean" in report["summary"]
    assert "ranked by the worse of it and the far error" in report["settings"]["split_reason"]


def test_attention_at_far_rows_is_the_modules_own_output_there(tiny_models: dict[str, Path]) -> None:
    """The split measurement and the fit score far rows without a quadratic pass; they must see what the module
    computes, for a source layer (GQA) and a DeepSeek-V3 one."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from mla_convert.conversion.attention_rows import far_rows, rows_output
    from mla_convert.conversion.calibrator import o_proj_input
    from mla_convert.conversion.layer_fit import rotary

    from .helpers import load

    source = load(tiny_models["llama_gqa_tied"])
    config = DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8, rope_interleave=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    x = torch.randn(2, 96, 64)
    rows = far_rows(96)
    assert rows.tolist() == list(range(48, 96))
    cases = [
        (source.model.layers[0].self_attn, rotary(source.model.rotary_emb, x, 96)),
        (DeepseekV3Attention(config, 0), rotary(DeepseekV3RotaryEmbedding(config), x, 96)),
    ]
    with torch.no_grad():
        for attn, pos in cases:
            full = o_proj_input(attn, x, pos)
            assert torch.allclose(rows_output(attn, x, pos, rows), full[:, rows], atol=1e-5)
