"""Half precision (method.md, "Precision"): on a bf16 / fp16 base the adapters and the merge statistics are
float32 (PEFT's default, ``autocast_adapter_dtype``), training moves every adapter entry, a merge writes W* in
the base's dtype, casting the wrapped model keeps the statistics usable, and torch.autocast works."""

from __future__ import annotations

import pytest
import torch

from _models import LLAMA, TOY, VARIANTS, randomize, train_forwards
from reslora import ResLoraModel, get_reslora_model

HALF = (torch.bfloat16, torch.float16)


def half_llama(variant: str, dtype: torch.dtype, **kw) -> ResLoraModel:
    return get_reslora_model(LLAMA.build().to(dtype), LLAMA.config(variant, pre_num=2, **kw))


def batch(seed: int = 0) -> dict:
    ids = LLAMA.inputs(seed)["input_ids"]
    return {"input_ids": ids, "labels": ids}


def train(model: ResLoraModel, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps (no weight decay: every change is the gradient's) on one batch; the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def lora_A(model: ResLoraModel) -> dict[str, torch.Tensor]:
    return {n: layer.lora_A.detach().clone() for n, layer in model.named_reslora_layers().items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_base_trains_fp32_adapters_and_merges_into_its_dtype(dtype, variant):
    model = half_llama(variant, dtype)
    for layer in model.named_reslora_layers().values():
        assert layer.weight.dtype == dtype
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        if variant in ("is", "ms"):
            assert layer.input_norms.dtype == layer.ax_norms.dtype == torch.float32
    start = lora_A(model)
    losses = train(model, steps=4, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    for name, A in lora_A(model).items():  # every entry moved (a bf16 adapter rounds most updates away)
        assert torch.isfinite(A).all() and (A != start[name]).all(), name

    model.eval()
    inputs = LLAMA.inputs(5)
    with torch.no_grad():
        unmerged = LLAMA.output(model, inputs)
        merged_model = model.merge_and_unload("merge_bi")
        merged = LLAMA.output(merged_model, inputs)
        with model.merged("merge_bi"):
            in_place = LLAMA.output(model, inputs)
    weights = {n: m.weight for n, m in merged_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(w.dtype == dtype for w in weights.values())
    assert unmerged.dtype == merged.dtype == dtype
    torch.testing.assert_close(in_place, merged, atol=0, rtol=0)
    if variant in ("lora", "bs"):  # exact merges: equal up to the base dtype's rounding
        torch.testing.assert_close(merged.float(), unmerged.float(), atol=2e-2, rtol=2e-2)


def test_keeping_the_base_dtype_is_an_option_and_stalls_bf16_training():
    """The reason for the float32 default: with bf16 adapters most AdamW updates at lr 1e-4 round away."""
    kept = half_llama("lora", torch.bfloat16, autocast_adapter_dtype=False)
    default = half_llama("lora", torch.bfloat16)
    assert all(layer.lora_A.dtype == torch.bfloat16 for layer in kept.named_reslora_layers().values())
    moved = {}
    for key, model in (("kept", kept), ("default", default)):
        start = lora_A(model)
        train(model, steps=4, lr=1e-4)
        after = lora_A(model)
        moved[key] = sum(int((after[n] != start[n]).sum()) for n in start) / sum(a.numel() for a in start.values())
    assert moved["default"] == 1.0 and moved["kept"] < 0.5, moved


def test_fp32_and_fp64_bases_keep_their_dtype():
    for spec, dtype in ((LLAMA, torch.float32), (TOY, torch.float64)):
        model = spec.wrap("ms")
        assert all(layer.lora_A.dtype == dtype for layer in model.named_reslora_layers().values())


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
@pytest.mark.parametrize("variant", ["is", "ms"])
def test_casting_the_wrapped_model_keeps_the_statistics_float32(variant, cast):
    model = LLAMA.wrap(variant, pre_num=2)
    randomize(model, a_scale=0.3)
    train_forwards(LLAMA, model, n=2)
    before = {n: (layer.input_norms.clone(), layer.ax_norms.clone()) for n, layer in model.named_reslora_layers().items()}
    model = model.to(torch.bfloat16) if cast == "bfloat16" else model.half()
    dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
    for name, layer in model.named_reslora_layers().items():
        assert layer.weight.dtype == layer.lora_A.dtype == dtype  # what the user asked for
        assert layer.input_norms.dtype == layer.ax_norms.dtype == torch.float32
        torch.testing.assert_close(layer.input_norms, before[name][0], atol=0, rtol=0)  # not rounded on the way
        torch.testing.assert_close(layer.ax_norms, before[name][1], atol=0, rtol=0)
    train_forwards(LLAMA, model, n=1, seed0=3)  # records into the float32 windows (crashed in index_copy_)
    assert all(int(layer.stat_count) == 3 for layer in model.named_reslora_layers().values())
    merged = model.merge_and_unload("merge_bi")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_forward_and_backward(variant):
    model = LLAMA.wrap(variant, pre_num=2)
    randomize(model, a_scale=0.3)
    model.train()
    want = model(**batch()).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch())
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), want, atol=0.1, rtol=0.05)
    out.loss.backward()
    for layer in model.named_reslora_layers().values():
        assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0


def test_fp32_adapter_of_a_bf16_base_saves_and_loads(tmp_path):
    model = half_llama("bs", torch.bfloat16)
    train(model, steps=2, lr=1e-3)
    model.save_pretrained(tmp_path)
    loaded = ResLoraModel.from_pretrained(LLAMA.build().to(torch.bfloat16), tmp_path)
    model.eval(), loaded.eval()
    inputs = LLAMA.inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(LLAMA.output(loaded, inputs), LLAMA.output(model, inputs), atol=0, rtol=0)
    assert all(layer.lora_A.dtype == torch.float32 for layer in loaded.named_reslora_layers().values())


def test_autocast_adapter_dtype_must_be_a_bool():
    from reslora import ResLoraConfig

    with pytest.raises(ValueError, match="autocast_adapter_dtype='no' must be True or False"):
        ResLoraConfig(autocast_adapter_dtype="no")
