"""merge_ls: the least-squares merge fitted on calibration activations (ours, not the paper's)."""

from __future__ import annotations

import pytest
import torch

from _models import SPECS, TOY, randomize, train_forwards
from reslora.merge import low_rank_factors


def fitted(variant, pre_num=2, ridge=0.0, spec=TOY):
    model = spec.wrap(variant, pre_num=pre_num)
    randomize(model, seed=0, b_scale=0.3, a_scale=0.3)
    train_forwards(spec, model, n=3)
    batches = [spec.inputs(s) for s in range(4)]
    model.fit_merge_ls(batches, ridge=ridge)
    return model, batches


def block_inputs(model, batches):
    """Every block's input for every calibration batch, recorded independently of the library."""
    layers = model.named_reslora_layers()
    seen = {name: [] for name in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for name, layer in layers.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_is_alpha_is_the_closed_form_least_squares_solution():
    model, batches = fitted("is")
    xs = block_inputs(model, batches)
    names = list(xs)
    for i, (name, layer) in enumerate(model.named_reslora_layers().items()):
        ba = layer.lora_B.detach() @ layer.lora_A.detach()
        u = xs[name] @ ba.T
        v = xs[names[i - 1]] @ ba.T if i else u
        want = (u * v).sum() / (u * u).sum()
        torch.testing.assert_close(layer.ls_solution.double(), want, rtol=1e-10, atol=1e-12)
        # optimal: no other alpha (e.g. merge_bi's norm ratio) fits the residual branch better
        for alpha in (want * 0.9, want * 1.1, torch.tensor(1.0, dtype=torch.float64)):
            assert (v - want * u).norm() <= (v - alpha * u).norm() + 1e-12


@pytest.mark.parametrize("pre_num", [1, 2, -1])
def test_ms_a_star_is_the_regression_solution_and_beats_the_norm_ratio_merge(pre_num):
    model, batches = fitted("ms", pre_num=pre_num)
    xs = block_inputs(model, batches)
    layers = model.named_reslora_layers()
    for name, layer in layers.items():
        prev_names = [n for n, other in layers.items() if any(other is p for p in layer.prev)]
        y = sum(xs[n] @ layers[n].lora_A.detach().T for n in [name, *prev_names])
        want = torch.linalg.lstsq(xs[name], y).solution.T
        torch.testing.assert_close(layer.ls_solution, want, rtol=1e-6, atol=1e-8)
        _, bw = low_rank_factors(layer, "merge_bw")
        assert (y - xs[name] @ want.T).norm() <= (y - xs[name] @ bw.T).norm() + 1e-10


def test_bs_merge_ls_is_exact_and_lora_is_plain():
    for variant in ("bs", "lora"):
        model, batches = fitted(variant)
        with torch.no_grad():
            want = TOY.output(model, batches[0])
            got = TOY.output(model.merge_and_unload("merge_ls"), batches[0])
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_merge_ls_needs_a_fit_and_batches(variant):
    model = TOY.wrap(variant, pre_num=2)
    randomize(model)
    with pytest.raises(RuntimeError, match="fit_merge_ls"):
        model.merge_and_unload("merge_ls")
    with pytest.raises(ValueError, match="no calibration batches"):
        model.fit_merge_ls([])


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_fit_leaves_the_model_unchanged_and_in_its_mode(variant):
    model = TOY.wrap(variant, pre_num=2)
    randomize(model, b_scale=0.3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fit_merge_ls([TOY.inputs(0)])
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_exported_peft_adapter_reproduces_the_merge_ls_model(tmp_path, variant):
    from peft import PeftModel

    spec = SPECS["bert"]
    model, _ = fitted(variant, spec=spec, ridge=1e-4)
    model.export_peft_adapter(tmp_path, "merge_ls")
    peft_model = PeftModel.from_pretrained(spec.build(), tmp_path).eval()
    inputs = spec.inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(spec.output(peft_model, inputs),
                                   spec.output(model.merge_and_unload("merge_ls"), inputs), atol=1e-5, rtol=1e-5)
