"""The research ablation ``detach_shortcut``: the forward pass is bit-identical to ResLoRA's, the gradient of every
block is what it gets when only its own layer uses it (the method.md equations with the residual terms held
constant, written out by hand in test_layers.reference), and merging and saving do not change."""

from __future__ import annotations

import pytest
import torch

from _models import BERT, LLAMA, VARIANTS, ToySpec, copy_adapter, randomize, train_forwards
from reslora import ResLoraConfig, ResLoraModel, get_reslora_model
from test_layers import UNIFORM, WIDTHS, build, previous_blocks, reference, weights

CASES = [(v, p) for v in VARIANTS for p in (0, 1, 2, -1)]


def detached_twin(model: ResLoraModel) -> ResLoraModel:
    """The same base and adapter as ``model`` (a toy from test_layers.build), with ``detach_shortcut``."""
    config = ResLoraConfig(**{**model.reslora_config.to_dict(), "detach_shortcut": True})
    twin = get_reslora_model(ToySpec(model.base_model.dims).build(), config)
    copy_adapter(model, twin)
    for mine, theirs in zip(model.named_reslora_layers().values(), twin.named_reslora_layers().values()):
        theirs.lora_dropout = mine.lora_dropout
    return twin


@pytest.mark.parametrize("with_masks", [False, True], ids=["dropout0", "fixedmask"])
@pytest.mark.parametrize("dims", [UNIFORM, WIDTHS], ids=["onechain", "widthchange"])
@pytest.mark.parametrize("variant,pre_num", CASES)
def test_forward_is_bit_identical_and_gradients_are_the_own_layers(variant, pre_num, dims, with_masks):
    spec, model, layers, masks = build(variant, pre_num, dims, with_masks, seed=1)
    twin = detached_twin(model)
    twin_layers = [twin.base_model.blocks[i].proj for i in range(len(dims) - 1)]
    assert all(layer.detach_shortcut for layer in twin_layers)
    model.train(), twin.train()
    x = spec.inputs(1)["x"]
    w = torch.randn(3, dims[-1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    out, twin_out = model(x), twin(x)
    assert torch.equal(out, twin_out)
    (out * w).sum().backward()
    (twin_out * w).sum().backward()
    got = [layer.lora_A.grad for layer in twin_layers] + [layer.lora_B.grad for layer in twin_layers]

    W, b, A, B = weights(layers, requires_grad=True)
    s = layers[0].scaling
    (reference(x, W, b, A, B, previous_blocks(dims), variant, pre_num, s, masks, detach=True) * w).sum().backward()
    want = [a.grad for a in A] + [bb.grad for bb in B]
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, atol=1e-10, rtol=1e-8)

    # where there is a residual term, cutting it changes some earlier block's gradient; elsewhere it changes nothing
    full = [layer.lora_A.grad for layer in layers] + [layer.lora_B.grad for layer in layers]
    difference = max((g1 - g2).abs().max().item() for g1, g2 in zip(full, got))
    has_shortcut = any(layer.prev for layer in layers) and variant != "lora"
    assert difference > 1e-6 if has_shortcut else difference == 0


@pytest.mark.parametrize("spec", [BERT, LLAMA], ids=lambda s: s.name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_forward_is_bit_identical(spec, variant):
    model = spec.wrap(variant, pre_num=2)
    twin = spec.wrap(variant, pre_num=2, detach_shortcut=True)
    randomize(model, a_scale=0.3)
    copy_adapter(model, twin)
    inputs = spec.inputs()
    assert torch.equal(spec.output(model, inputs), spec.output(twin, inputs))


@pytest.mark.parametrize("mode", ["plain", "merge_bi", "merge_bw"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merging_and_saving_are_unaffected(tmp_path, variant, mode):
    model = BERT.wrap(variant, pre_num=2)
    twin = BERT.wrap(variant, pre_num=2, detach_shortcut=True)
    randomize(model, a_scale=0.3)
    copy_adapter(model, twin)
    for m in (model, twin):  # identical forwards: identical merge statistics
        train_forwards(BERT, m)
    inputs = BERT.inputs(3)
    assert torch.equal(BERT.output(model.merge_and_unload(mode), inputs),
                       BERT.output(twin.merge_and_unload(mode), inputs))

    twin.save_adapter(tmp_path)
    loaded = ResLoraModel.from_pretrained(BERT.build(), tmp_path)
    assert loaded.reslora_config.detach_shortcut is True
    assert all(layer.detach_shortcut for layer in loaded.named_reslora_layers().values())
    assert torch.equal(BERT.output(loaded, inputs), BERT.output(twin, inputs))
    assert ResLoraConfig.load(tmp_path) == twin.reslora_config


def test_flag_must_be_a_bool():
    with pytest.raises(ValueError, match="detach_shortcut='yes' must be True or False"):
        ResLoraConfig(detach_shortcut="yes")
