"""Merging (method.md, "Inference"): bs exact, is/ms by the formulas, plain, the merged model is a plain base
model, the ResLoRA model is left untouched, statistics, PEFT export."""

from __future__ import annotations

import gc
import json
import sys
import types

import pytest
import torch

from _models import (BERT, SPECS, TOY, VARIANTS, ToySpec, chains_of, expected_chains, n_params, randomize,
                     role, train_forwards)
from reslora import MERGE_MODES, ResLoraLinear, ResLoraModel, merged_weights
from reslora.layers import ForwardSlot, ForwardState
from reslora.model import Chain

MODES = ("plain", "merge_bi", "merge_bw")  # the paper's modes; merge_ls needs a fit (test_merge_ls.py)


def trained(spec, variant, pre_num=2, seed=0, **kw):
    model = spec.wrap(variant, pre_num=pre_num, **kw)
    randomize(model, seed=seed, b_scale=0.3, a_scale=0.3)
    train_forwards(spec, model, n=3)
    return model


# ---- bs merges exactly; lora and plain --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["merge_bi", "merge_bw"])
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("name", ["toy", "bert", "llama_all", "unet"])
def test_bs_merged_equals_unmerged(name, pre_num, mode):
    spec = SPECS[name]
    model = trained(spec, "bs", pre_num)
    merged = model.merge_and_unload(mode)
    inputs = spec.inputs(7)
    with torch.no_grad():
        want = spec.output(model, inputs)
        got = spec.output(merged, inputs)
        plain = spec.output(model.merge_and_unload("plain"), inputs)
    tol = 1e-10 if spec.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert (plain - want).abs().max() > 1e-4  # the residual blocks matter, so the check above means something


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["toy", "bert", "llama_all", "unet"])
def test_lora_merged_equals_unmerged(name, mode):
    spec = SPECS[name]
    model = trained(spec, "lora")
    inputs = spec.inputs(7)
    with torch.no_grad():
        want, got = spec.output(model, inputs), spec.output(model.merge_and_unload(mode), inputs)
    tol = 1e-10 if spec.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def expected_merged(model, chains: list[list[str]], mode: str) -> dict[str, torch.Tensor]:
    """W*_n from method.md, computed here from the layers' weights and recorded statistics (mean_norms)."""
    cfg = model.reslora_config
    layers = model.named_reslora_layers()
    s = cfg.lora_alpha / cfg.r
    out = {}
    for chain in chains:
        L = [layers[n] for n in chain]
        W = [l.base_layer.weight.detach().double() for l in L]
        A = [l.lora_A.detach().double() for l in L]
        B = [l.lora_B.detach().double() for l in L]
        for i, name in enumerate(chain):
            if cfg.variant == "lora" or mode == "plain":
                out[name] = W[i] + s * B[i] @ A[i]
                continue
            earlier = list(range(i - 1, -1, -1))
            used = earlier if cfg.pre_num == -1 else earlier[:cfg.pre_num]
            if cfg.variant == "bs":
                out[name] = W[i] + s * sum(B[k] @ A[k] for k in [i, *used])
                continue
            f = [float(l.mean_norms()[0]) for l in L] if mode == "merge_bi" or cfg.variant == "ms" else None
            if cfg.variant == "is" and mode == "merge_bi":
                alpha = 1.0 if i == 0 else f[i - 1] / f[i]
            elif cfg.variant == "is":  # merge_bw
                fstar = [torch.linalg.norm(W[j] + s * B[j] @ A[j]).item() for j in range(len(L))]
                alpha = 1.0 if i < 2 else fstar[i - 2] / fstar[i - 1]
            elif mode == "merge_bi":  # ms
                g = [float(l.mean_norms()[1]) for l in L]
                alpha = sum(g[k] for k in used) / g[i]
            else:  # ms merge_bw
                A_star = A[i] + sum((f[k] / f[i]) * A[k] for k in used) if used else A[i]
                out[name] = W[i] + s * B[i] @ A_star
                continue
            out[name] = W[i] + (1 + alpha) * s * B[i] @ A[i]
    return out


FORMULA_CASES = [("is", 1), ("is", 3), ("ms", 1), ("ms", 2), ("ms", -1), ("bs", 2), ("lora", 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant,pre_num", FORMULA_CASES)
@pytest.mark.parametrize("name", ["toy", "toy_widths", "bert", "llama_all"])
def test_merged_weights_follow_the_formulas(name, variant, pre_num, mode):
    spec = ToySpec((6, 6, 6, 4, 4, 4, 4)) if name == "toy_widths" else SPECS[name]
    model = trained(spec, variant, pre_num)
    layers = model.named_reslora_layers()
    chains = expected_chains([(n, tuple(l.weight.shape)) for n, l in layers.items()], role)
    assert chains_of(model) == sorted(chains)
    if variant in ("is", "ms"):
        for layer in layers.values():
            f, g = layer.mean_norms()
            assert int(layer.stat_count) == 3 and f > 0 and (g > 0 if variant == "ms" else True)
    want = expected_merged(model, chains, mode)
    got = {n: w for n, w in ((n, merged_weights(model, mode)[l]) for n, l in layers.items())}
    merged = model.merge_and_unload(mode)
    tol = dict(atol=1e-10, rtol=1e-10) if spec.dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    for n in layers:
        if spec.dtype == torch.float64 and variant in ("is", "ms") and mode != "plain":
            tol = dict(atol=1e-7, rtol=1e-6)  # alpha comes from the float32 statistics
        torch.testing.assert_close(got[n].double(), want[n], **tol)
        torch.testing.assert_close(merged.get_submodule(n).weight.double(), want[n], **tol)
        bias = layers[n].base_layer.bias
        if bias is not None:
            torch.testing.assert_close(merged.get_submodule(n).bias, bias, atol=0, rtol=0)
    if variant in ("is", "ms") and mode != "plain":
        # the residual merge is not plain LoRA: at least the non-first blocks differ from W + sBA
        plain = expected_merged(model, chains, "plain")
        assert max((want[n] - plain[n]).abs().max().item() for n in layers) > 1e-4


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_first_block_of_a_chain_merges_as_its_equation(variant):
    """For a chain's first block the equations are exact: is -> W + 2 s B A (x_{n-1} := x_n), ms -> W + s B A."""
    model = trained(TOY, variant, 2)
    first = model.base_model.blocks[0].proj
    want = first.weight + (2 if variant == "is" else 1) * first.delta_weight()
    for mode in ("merge_bi", "merge_bw"):
        torch.testing.assert_close(merged_weights(model, mode)[first], want.detach(), atol=1e-12, rtol=1e-12)


# ---- the merged model is a plain base model; the ResLoRA model is untouched -------------------------------
def reachable_reslora_objects(root) -> list:
    """Instances of the library's classes reachable from ``root`` (not through modules, classes or module
    globals)."""
    module_dicts = {id(m.__dict__) for m in list(sys.modules.values()) if m is not None}
    ours = (ResLoraModel, ResLoraLinear, ForwardSlot, ForwardState, Chain)
    seen, todo, found = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)) or id(obj) in module_dicts:
            continue
        seen.add(id(obj))
        if isinstance(obj, ours):
            found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in module.modules()]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["toy", "bert", "llama_all", "unet"])
def test_merged_model_is_plain_and_the_reslora_model_is_unchanged(name, variant):
    spec = SPECS[name]
    extra = {"modules_to_save": ["classifier"]} if name == "bert" else {}
    model = trained(spec, variant, 2, **extra)
    fresh = spec.build()
    before = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    inputs = spec.inputs(3)
    with torch.no_grad():
        out_before = spec.output(model, inputs)
    chains_before = chains_of(model)
    assert reachable_reslora_objects(model.base_model)  # the probe below can see the wrapper's objects
    for mode in MODES:
        merged = model.merge_and_unload(mode)
        assert type(merged) is type(fresh)
        assert not any(isinstance(m, ResLoraLinear) for m in merged.modules())
        assert n_params(merged) == n_params(fresh)
        assert list(merged.state_dict()) == list(fresh.state_dict())
        assert [type(m) for m in merged.modules()] == [type(m) for m in fresh.modules()]
        assert _hooks(merged) == _hooks(fresh)
        assert not any(any(h) for h in _hooks(merged))  # no forward (pre-)hook anywhere
        assert not reachable_reslora_objects(merged)  # nothing of the wrapper comes along
        merged_out = spec.output(merged, inputs)
        assert merged_out.shape == out_before.shape
        # the merged model owns its tensors
        ours = {p.data_ptr() for p in model.parameters()}
        assert not any(p.data_ptr() in ours for p in merged.parameters())
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert chains_of(model) == chains_before
    with torch.no_grad():
        torch.testing.assert_close(spec.output(model, inputs), out_before, atol=0, rtol=0)
    # the base weights inside the ResLoRA model were not folded in place
    for n, layer in model.named_reslora_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, fresh.get_submodule(n).weight, atol=0, rtol=0)


def test_merged_model_keeps_trained_modules_to_save():
    model = trained(BERT, "is", modules_to_save=["classifier"])
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)
    merged = model.merge_and_unload("merge_bi")
    torch.testing.assert_close(merged.classifier.weight, model.base_model.classifier.weight, atol=0, rtol=0)


def test_merged_checkpointed_model_does_not_carry_the_wrapper():
    """A model wrapped with checkpointing enabled merges into a plain model that knows nothing of ResLoRA but
    still checkpoints (same outputs and gradients as without checkpointing)."""
    import copy

    from _models import LLAMA

    model = LLAMA.wrap("is")
    randomize(model)
    model.gradient_checkpointing_enable()
    model.train()
    LLAMA.output(model, LLAMA.inputs()).sum().backward()
    merged = model.merge_and_unload("merge_bi")
    assert not reachable_reslora_objects(merged)
    reference = copy.deepcopy(merged)
    reference.gradient_checkpointing_disable()
    calls = []
    merged.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    grads = []
    for m in (merged, reference):
        m.train()
        m.requires_grad_(True)
        LLAMA.output(m, LLAMA.inputs(1)).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert len(calls) == 2  # forward + recomputation: still checkpointed
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, atol=1e-6, rtol=1e-5)


# ---- merge statistics ----------------------------------------------------------------------------------
def _capture_inputs(model):
    seen = {n: [] for n in model.named_reslora_layers()}
    handles = [layer.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach().clone()))
               for n, layer in model.named_reslora_layers().items()]
    return seen, handles


@pytest.mark.parametrize("forwards", [2, 3, 5])
@pytest.mark.parametrize("variant", ["is", "ms"])
def test_statistics_sliding_window(variant, forwards):
    spec = TOY
    model = spec.wrap(variant, pre_num=2, window=3)
    randomize(model, a_scale=0.3)
    seen, handles = _capture_inputs(model)
    model.train()
    for i in range(forwards):
        spec.output(model, spec.inputs(i))
    for h in handles:
        h.remove()
    for n, layer in model.named_reslora_layers().items():
        xs = seen[n][-3:]
        assert len(seen[n]) == forwards and int(layer.stat_count) == forwards
        f, g = layer.mean_norms()
        assert f.dtype == torch.float32 and f.device == layer.lora_A.device
        want_f = torch.stack([x.norm() for x in xs]).mean()
        torch.testing.assert_close(f.double(), want_f, atol=1e-6, rtol=1e-6)
        if variant == "ms":
            want_g = torch.stack([(x @ layer.lora_A.detach().T).norm() for x in xs]).mean()
            torch.testing.assert_close(g.double(), want_g, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_statistics_recorded_in_training_mode_only(variant):
    spec = TOY
    model = spec.wrap(variant, window=4)
    randomize(model)
    assert all(l.mean_norms() is None for l in model.named_reslora_layers().values())
    model.eval()
    spec.output(model, spec.inputs(0))
    with torch.no_grad():
        spec.output(model, spec.inputs(1))
    assert all(int(l.stat_count) == 0 and l.mean_norms() is None for l in model.named_reslora_layers().values())
    model.train()
    spec.output(model, spec.inputs(2))
    snap = _snapshot(model)
    model.eval()
    spec.output(model, spec.inputs(3))
    for k, v in _snapshot(model).items():
        torch.testing.assert_close(v, snap[k], atol=0, rtol=0)
    assert all(int(l.stat_count) == 1 for l in model.named_reslora_layers().values())


@pytest.mark.parametrize("as_dict", [True, False])
@pytest.mark.parametrize("variant", ["is", "ms"])
def test_calibrate_fills_the_statistics_in_eval_mode(variant, as_dict):
    spec = TOY
    model = spec.wrap(variant, pre_num=1, window=10)
    randomize(model, a_scale=0.3)
    model.eval()
    with pytest.raises(RuntimeError, match="calibrate"):
        model.merge_and_unload("merge_bi")
    batches = [spec.inputs(i) for i in range(4)]
    seen, handles = _capture_inputs(model)
    model.calibrate(batches if as_dict else [b["x"] for b in batches])
    for h in handles:
        h.remove()
    assert not model.training and not model._slot.calibrating and model._slot.current is None
    for n, layer in model.named_reslora_layers().items():
        assert int(layer.stat_count) == 4
        want = torch.stack([x.norm() for x in seen[n]]).mean()
        torch.testing.assert_close(layer.mean_norms()[0].double(), want, atol=1e-6, rtol=1e-6)
    model.merge_and_unload("merge_bi")  # now possible
    # after calibration, evaluation forwards record nothing again
    spec.output(model, spec.inputs(9))
    assert all(int(l.stat_count) == 4 for l in model.named_reslora_layers().values())


# ---- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["is", "ms"])
def test_merge_bi_before_any_training_forward_says_calibrate(variant):
    model = TOY.wrap(variant)
    randomize(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        model.merge_and_unload("merge_bi")
    with pytest.raises(RuntimeError, match="calibrate"):
        merged_weights(model, "merge_bi")
    if variant == "ms":
        with pytest.raises(RuntimeError, match="calibrate"):
            model.merge_and_unload("merge_bw")
    else:  # is merge_bw uses weights only
        model.merge_and_unload("merge_bw")
    model.merge_and_unload("plain")


@pytest.mark.parametrize("mode,pattern", [("unmerged", "unmerged"), ("merge", "merge mode"), ("", "merge mode"),
                                          ("MERGE_BI", "merge mode")])
def test_bad_merge_modes(tmp_path, mode, pattern):
    model = trained(TOY, "is")
    with pytest.raises(ValueError, match=pattern):
        model.merge_and_unload(mode)
    with pytest.raises(ValueError, match=pattern):
        merged_weights(model, mode)
    with pytest.raises(ValueError, match=pattern):
        model.export_peft_adapter(tmp_path / "x", mode)
    assert set(MERGE_MODES) == set(MODES) | {"merge_ls"}  # merge_ls: tests/test_merge_ls.py


# ---- PEFT export -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["bert", "llama_all", "unet"])
def test_exported_peft_adapter_reproduces_the_merged_model(tmp_path, name, variant, mode):
    from peft import PeftModel

    spec = SPECS[name]
    extra = {"modules_to_save": ["classifier"]} if name == "bert" else {}
    model = trained(spec, variant, pre_num=2, **extra)
    if extra:
        with torch.no_grad():
            model.base_model.classifier.weight.mul_(-3.0)
    model.export_peft_adapter(tmp_path, mode)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_model = PeftModel.from_pretrained(spec.build(), tmp_path)
    peft_model.eval()
    inputs = spec.inputs(4)
    with torch.no_grad():
        want = spec.output(model.merge_and_unload(mode), inputs)
        got = spec.output(peft_model, inputs)
        base = spec.output(spec.build(), inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-4
    r = model.reslora_config.r
    if variant == "bs" and mode != "plain":
        want_ranks = {n: (len(l.prev) + 1) * r for n, l in model.named_reslora_layers().items() if l.prev}
        assert want_ranks and config["rank_pattern"] == want_ranks
        assert max(want_ranks.values()) == min(3, max(len(c.layers) for c in model.chains)) * r  # pre_num=2
    else:
        assert not config.get("rank_pattern")
    if extra:
        assert config["modules_to_save"] == ["classifier"]


# ---- merged in place (model.merged(mode)) -----------------------------------------------------------------------
def target_weights(model: ResLoraModel) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight for name, layer in model.named_reslora_layers().items()}


@pytest.mark.parametrize("mode", [*MODES, "merge_ls"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["toy", "bert", "llama_all", "unet"])
def test_merged_in_place_equals_merge_and_unload_and_restores_exactly(name, variant, mode):
    spec = SPECS[name]
    model = trained(spec, variant)
    if mode == "merge_ls":
        model.fit_merge_ls([spec.inputs(seed=7)])
    model.eval()
    inputs = spec.inputs(seed=3)
    with torch.no_grad():
        expected = spec.output(model.merge_and_unload(mode), inputs)
        weights = target_weights(model)
        saved = {k: w.detach().clone() for k, w in weights.items()}
        unmerged = spec.output(model, inputs)
        with model.merged(mode) as merged:
            assert merged is model
            inside = spec.output(model, inputs)
        after = spec.output(model, inputs)
    assert torch.equal(inside, expected)  # the same numbers, bit for bit
    assert torch.equal(after, unmerged)
    for key, weight in target_weights(model).items():
        assert weight is weights[key] and torch.equal(weight, saved[key])  # the same tensors, unchanged


def test_an_exception_inside_merged_restores_the_model_and_training_state_is_untouched():
    model = trained(BERT, "ms")
    inputs = BERT.inputs(seed=1)
    BERT.output(model, inputs).sum().backward()  # gradients from a training step
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    weights = {k: w.detach().clone() for k, w in target_weights(model).items()}
    with pytest.raises(KeyError):
        with model.merged("merge_bi"):
            BERT.output(model, inputs)  # a forward in training mode: must record no statistics
            raise KeyError("boom")
    assert all(torch.equal(w, weights[k]) for k, w in target_weights(model).items())
    assert not any(layer.merged_in_place for layer in model.named_reslora_layers().values())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
