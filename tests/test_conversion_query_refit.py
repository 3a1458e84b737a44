"""Query refit (--query-refit): with the keys fixed, the query map is refitted to the source's attention
logits; it lowers the logit error and the held-out output error where there is room, and leaves exact
maps exact."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mla_convert import Options, convert
from mla_convert.conversion.calibrator import SequentialCalibrator
from mla_convert.conversion.driver import layer_tensors
from mla_convert.conversion.layer_fit import batched, build_layer, relative
from mla_convert.conversion.query_refit import logits, queries_and_keys, refit_queries
from mla_convert.plan.plan import plan_for
from mla_convert.source.checkpoint import resolve

from .conftest import QUICK_CALIB
from .helpers import max_logit_diff, random_ids


def layer_zero(model_dir, kv_rank: int | None, rope_dim: int | None):  # type: ignore[no-untyped-def]
    """Layer 0 converted in closed form, its calibration inputs, the source attention and its output."""
    source = resolve(str(model_dir))
    plan = plan_for(source.config, Options(kv_rank=kv_rank, rope_dim=rope_dim))
    ids = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrator = SequentialCalibrator(source, plan, ids)
    cov = calibrator.covariance(0)
    tensors, _ = layer_tensors(source, plan, 0, cov, "cpu")
    x = calibrator._x
    assert x is not None
    src_attn = calibrator.source.layer(0).self_attn
    with torch.no_grad():
        target = batched(lambda t: src_attn(t, calibrator.src_pos, None)[0], x) * calibrator.lam
    layer = build_layer(calibrator.config, 0, tensors, "cpu")
    return layer.self_attn, src_attn, x, calibrator.ds_pos, calibrator.src_pos, target


def test_the_captured_logits_are_the_modules_own(tiny_models) -> None:
    """Softmax of the captured source logits over its values, through o_proj, is the source's output."""
    _, src_attn, x, _, src_pos, _ = layer_zero(tiny_models["llama_gqa_tied"], kv_rank=8, rope_dim=8)
    x = x[:2]
    batch, seq, _ = x.shape
    with torch.no_grad():
        scores = logits(*queries_and_keys(src_attn, x, src_pos), src_attn.scaling)
        heads = scores.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        values = src_attn.v_proj(x).view(batch, seq, -1, src_attn.head_dim).transpose(1, 2)
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
        mixed = (weights @ values).transpose(1, 2).reshape(batch, seq, -1)
        assert torch.allclose(src_attn.o_proj(mixed), src_attn(x, src_pos, None)[0], atol=1e-5)


def test_query_refit_lowers_the_logit_and_held_out_errors(tiny_models) -> None:
    attn, src_attn, x, pos, src_pos, target = layer_zero(tiny_models["llama_gqa_tied"], kv_rank=8, rope_dim=4)
    refit = refit_queries(attn, src_attn, x, pos, src_pos, target)
    assert refit.logit_error_after < 0.9 * refit.logit_error_before, refit
    assert refit.after < refit.before, refit
    held = max(1, x.shape[0] // 8)
    with torch.no_grad():
        out = attn(x[-held:], pos, None)[0]
    assert relative(out, target[-held:]) == refit.after  # the module holds the refitted queries


def test_query_refit_keeps_an_exact_map_exact(tiny_models, tmp_path) -> None:
    """Run by hand on an exact layer it stays exact; a conversion at full size does not run it at all
    (on SmolLM2 it never improved a full-size layer), so its checkpoint is the closed form's."""
    source = tiny_models["llama_dependent_heads"]  # portable and calibrated, yet exact
    attn, src_attn, x, pos, src_pos, target = layer_zero(source, kv_rank=None, rope_dim=None)
    refit = refit_queries(attn, src_attn, x, pos, src_pos, target)
    assert refit.before < 1e-5 and refit.after <= refit.before
    plain, default = tmp_path / "plain", tmp_path / "default"
    convert(source, plain, Options(verify=False, query_refit=False, **QUICK_CALIB))
    report = convert(source, default, Options(verify=False, **QUICK_CALIB))
    assert max_logit_diff(source, default, random_ids(256, 96)) <= 1e-3
    assert all("query_refit_error_before" not in layer for layer in report["layers"])
    a, b = load_file(plain / "model.safetensors"), load_file(default / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_compressed_conversion_refits_the_queries_and_reports_each_layer(tiny_models, tmp_path) -> None:
    report = convert(tiny_models["llama_gqa_tied"], tmp_path / "out", Options(kv_rank=8, verify=False, **QUICK_CALIB))
    for layer in report["layers"]:
        assert layer["query_refit_error_after"] <= layer["query_refit_error_before"]


def test_query_refit_leaves_the_query_map_trainable_for_the_layer_wise_steps(tiny_models) -> None:
    attn, src_attn, x, pos, src_pos, target = layer_zero(tiny_models["llama_gqa_tied"], kv_rank=8, rope_dim=4)
    assert attn.q_proj.weight.requires_grad
    refit_queries(attn, src_attn, x, pos, src_pos, target)
    assert attn.q_proj.weight.requires_grad and attn.q_proj.weight.grad is None
