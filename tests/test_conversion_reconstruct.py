"""Layer-wise reconstruction (--layer-steps): it lowers a layer's output error on held-out calibration
windows when there is room, never leaves a layer worse, and keeps exact maps exact."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from mla_convert import Hooks, Options, convert
from mla_convert.conversion.calibrator import SequentialCalibrator
from mla_convert.conversion.driver import layer_tensors
from mla_convert.conversion.layer_fit import batched, build_layer, relative
from mla_convert.conversion.reconstruct import reconstruct
from mla_convert.plan.plan import plan_for
from mla_convert.source.checkpoint import resolve

from .conftest import QUICK_CALIB
from .helpers import max_logit_diff, random_ids


def first_layer(model_dir, kv_rank: int = 8, rope_dim: int = 8, windows: int = 48):  # type: ignore[no-untyped-def]
    """Layer 0 of a compressed conversion, its calibration inputs and the source output it should match."""
    source = resolve(str(model_dir))
    plan = plan_for(source.config, Options(kv_rank=kv_rank, rope_dim=rope_dim))
    ids = torch.randint(0, 256, (windows, 32), generator=torch.Generator().manual_seed(0))
    calibrator = SequentialCalibrator(source, plan, ids)
    cov = calibrator.covariance(0)
    tensors, _ = layer_tensors(source, plan, 0, cov, "cpu")
    x = calibrator._x
    assert x is not None
    with torch.no_grad():
        target = batched(lambda t: calibrator.source.layer(0).self_attn(t, calibrator.src_pos, None)[0], x)
    return build_layer(calibrator.config, 0, tensors, "cpu"), x, target * calibrator.lam, calibrator.ds_pos


def test_reconstruction_recovers_a_damaged_layer_on_held_out_windows(tiny_models) -> None:
    """Damage the closed form's value and output maps; the optimisation must win most of it back on windows
    it never trained on."""
    layer, x, target, pos = first_layer(tiny_models["llama_gqa_tied"])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for weight in (layer.self_attn.kv_b_proj.weight, layer.self_attn.o_proj.weight):
            weight.mul_(1 + 0.3 * torch.randn(weight.shape, generator=gen))
    fit = reconstruct(layer, x, target, pos, steps=300, lr=3e-3)
    assert fit.steps > 0
    assert fit.after < 0.9 * fit.before, fit
    held = max(1, x.shape[0] // 8)
    with torch.no_grad():
        out = layer.self_attn(x[-held:], pos, None)[0]
    assert relative(out, target[-held:]) == pytest.approx(fit.after, rel=1e-4)  # the layer holds the result


def test_a_layer_that_cannot_improve_is_left_bit_for_bit(tiny_models) -> None:
    layer, x, target, pos = first_layer(tiny_models["llama_gqa_tied"])
    before = copy.deepcopy(layer.self_attn.state_dict())
    fit = reconstruct(layer, x, target, pos, steps=50, lr=10.0)  # far too large: every step makes it worse
    assert fit.after == fit.before
    after = layer.self_attn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_layer_steps_keep_an_exact_map_exact_and_report_each_layer(tiny_models, tmp_path) -> None:
    source = tiny_models["llama_dependent_heads"]  # portable and calibrated, yet exact: nothing to gain
    plain, steps = tmp_path / "plain", tmp_path / "steps"
    convert(source, plain, Options(verify=False, **QUICK_CALIB))
    report = convert(source, steps, Options(verify=False, layer_steps=60, **QUICK_CALIB))
    assert max_logit_diff(source, steps, random_ids(256, 96)) <= 1e-3
    for layer in report["layers"]:
        assert layer["reconstruction_steps"] > 0
        assert layer["held_out_error_after"] <= layer["held_out_error_before"]
    a, b = load_file(plain / "model.safetensors"), load_file(steps / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # no gain on an exact layer: the closed form is written


def test_layer_steps_need_calibration_text(cli, tiny_llama, tmp_path) -> None:
    result = cli(tiny_llama, tmp_path / "out", "--method", "svd", "--layer-steps", "10")
    assert result.exit_code == 2 and "--layer-steps fits layers to calibration text" in result.stderr


def test_an_explicit_rope_dim_has_its_ladder_measured(tiny_models, tmp_path) -> None:
    """A width the user fixes is still placed on the source frequencies that measure best (stride 1 or 2,
    or two slots per source frequency)."""
    stages: list[str] = []
    hooks = Hooks(on_stage=lambda text, total=None: stages.append(text))
    options = Options(kv_rank=12, rope_dim=4, verify=False, **QUICK_CALIB)
    report = convert(tiny_models["llama_gqa_tied"], tmp_path / "out", options, hooks=hooks)
    assert any(text.startswith("measuring 3 rotary ladders for --rope-dim 4") for text in stages), stages
    reason = report["settings"]["split_reason"]
    assert reason.startswith("ranks given on the command line; measured on calibration windows")
    assert "stride 1" in reason and "stride 2" in reason and "density 2" in reason
    assert (report["settings"]["rotary_stride"], report["settings"]["rotary_density"]) in {(1, 1), (2, 1), (1, 2)}


def test_the_natural_latent_norm_is_trained_as_stored(tiny_models) -> None:
    """In the ordinary latent-norm regime the stored rows are the natural map (no epsilon scale, nothing
    folded): the steps lower the held-out error and the norm's gain stays the calibrated latent RMS."""
    from mla_convert.mla.natural_scale import to_natural_norm

    layer, x, target, pos = first_layer(tiny_models["llama_gqa_tied"])
    attn = layer.self_attn
    exact = reconstruct(layer, x, target, pos, steps=0).before
    rank = attn.kv_a_layernorm.weight.numel()
    scaled = float(attn.kv_a_proj_with_mqa.weight[:rank].detach().abs().max())
    to_natural_norm(attn, x)
    gain = attn.kv_a_layernorm.weight.detach().clone()
    assert float(attn.kv_a_proj_with_mqa.weight[:rank].detach().abs().max()) > 1e3 * scaled  # no epsilon-regime scale
    with torch.no_grad():
        latent = attn.kv_a_proj_with_mqa(x)[..., :rank]
    assert float(gain[0]) == pytest.approx(float(latent.pow(2).mean(-1).sqrt().mean()), rel=1e-4)
    fit = reconstruct(layer, x, target, pos, steps=300, lr=3e-3, natural_norm=True)
    assert fit.before > exact  # the per-token rescaling costs accuracy ...
    assert fit.after < fit.before  # ... which the steps win partly back
    assert torch.equal(attn.kv_a_layernorm.weight, gain)  # frozen, and nothing folded
