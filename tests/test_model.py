"""Wrapping real (tiny) models: zero-init identity, LoRA == PEFT, chains, per-forward state, checkpointing,
save/load, configuration errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from _models import (BERT, LLAMA, LLAMA_ALL, SPECS, TOY, UNET, VARIANTS, BertSpec, ToySpec, block_template, chains_of,
                     copy_adapter, expected_chains, randomize, role, train_forwards)
from reslora import ResLoraConfig, ResLoraLinear, ResLoraModel, get_reslora_model, merged_weights

REAL = ["bert", "llama", "llama_all", "unet"]
ALL = ["toy", *REAL]


def named_shapes(model) -> list[tuple[str, tuple]]:
    return [(n, tuple(m.weight.shape)) for n, m in model.named_reslora_layers().items()]


# ---- zero init / non-zero B ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL)
def test_zero_B_equals_base_and_random_B_differs(name, variant):
    spec = SPECS[name]
    inputs = spec.inputs()
    with torch.no_grad():
        want = spec.output(spec.build(), inputs)
        model = spec.wrap(variant, pre_num=2)
        assert len(model.named_reslora_layers()) > 0
        torch.testing.assert_close(spec.output(model, inputs), want, atol=0, rtol=0)
        randomize(model)
        assert (spec.output(model, inputs) - want).abs().max() > 1e-4


@pytest.mark.parametrize("name", ALL)
def test_only_adapters_are_trainable(name):
    model = SPECS[name].wrap("ms")
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    layers = model.named_reslora_layers()
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    assert all(isinstance(m, ResLoraLinear) for m in layers.values())
    base_linears = {n for n, m in SPECS[name].build().named_modules()
                    if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t)
                                                              for t in SPECS[name].targets)}
    assert set(layers) == base_linears


# ---- variant=lora is PEFT's LoRA ------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL)
def test_lora_equals_peft_lora(name):
    from peft import LoraConfig, get_peft_model

    spec = SPECS[name]
    model = spec.wrap("lora", r=3, lora_alpha=5.0)
    randomize(model, seed=3, b_scale=0.3, a_scale=0.3)
    peft_model = get_peft_model(spec.build(), LoraConfig(r=3, lora_alpha=5.0, lora_dropout=0.0,
                                                         target_modules=list(spec.targets)))
    peft_layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")
                   and "default" in getattr(m, "lora_A", {})}
    assert set(peft_layers) == set(model.named_reslora_layers())
    with torch.no_grad():
        for name_, layer in model.named_reslora_layers().items():
            peft_layers[name_].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name_].lora_B["default"].weight.copy_(layer.lora_B)
            assert peft_layers[name_].scaling["default"] == pytest.approx(layer.scaling)
    inputs = spec.inputs()
    with torch.no_grad():
        ours, theirs = spec.output(model, inputs), spec.output(peft_model, inputs)
        base = spec.output(spec.build(), inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-4


# ---- bs pre_num=0 == lora; pre_num=-1 == all previous blocks -------------------------------------------
@pytest.mark.parametrize("name", ["toy", "bert", "llama_all", "unet"])
def test_bs_pre_num_0_equals_lora(name):
    spec = SPECS[name]
    lora = spec.wrap("lora")
    randomize(lora, seed=4)
    bs = spec.wrap("bs", pre_num=0)
    copy_adapter(lora, bs)
    assert all(len(layer.prev) == 0 for layer in bs.named_reslora_layers().values())
    inputs = spec.inputs()
    with torch.no_grad():
        torch.testing.assert_close(spec.output(bs, inputs), spec.output(lora, inputs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["bs", "ms"])
@pytest.mark.parametrize("name", ["bert", "llama_all"])
def test_pre_num_minus_one_uses_every_previous_block(name, variant):
    spec = SPECS[name]
    models = {p: spec.wrap(variant, pre_num=p) for p in (-1, 1, 99)}
    randomize(models[-1], seed=5)
    for p in (1, 99):
        copy_adapter(models[-1], models[p])
    longest = 0
    for chain in models[-1].chains:
        for pos, layer in enumerate(chain.layers):
            assert [id(p) for p in layer.prev] == [id(p) for p in chain.layers[:pos][::-1]]
            longest = max(longest, pos)
    assert longest >= 2  # some block really has more than one previous block
    inputs = spec.inputs()
    with torch.no_grad():
        out = {p: spec.output(m, inputs) for p, m in models.items()}
    torch.testing.assert_close(out[-1], out[99], atol=1e-6, rtol=1e-6)
    assert (out[-1] - out[1]).abs().max() > 1e-5


# ---- chains ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["bert", "llama_all", "unet"])
def test_chains_group_by_role_and_break_where_shapes_change(name, variant):
    spec = SPECS[name]
    model = spec.wrap(variant, pre_num=-1)
    want = expected_chains(named_shapes(model), block_template)
    assert chains_of(model) == sorted(want)
    for chain in model.chains:
        assert len({tuple(layer.weight.shape) for layer in chain.layers}) == 1
        assert len({role(n) for n in chain.names}) == 1
    if name in ("bert", "llama_all"):  # one stack, one parent per target name: the same chains as grouping by name
        assert sorted(want) == sorted(expected_chains(named_shapes(model), lambda n: n.split(".")[-1]))
    if name == "llama_all":
        assert sorted(len(c) for c in want) == [3] * 7  # q and o have equal shapes but are separate chains
    if name == "unet":
        # self- and cross-attention are separate roles: every role has its own chains. Without layer_order the
        # down, mid and up blocks are separate parts: each role has one block in down_blocks and the 16-wide mid
        # block, and two in up_blocks
        roles = {role(c[0]) for c in want}
        assert roles == {f"attn{i}.{t}" for i in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out.0")}
        assert sorted(len(c) for c in want) == [1] * 16 + [2] * 8
        assert ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] in want


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_unet_chains_of_one_role_see_one_kind_of_activation(variant):
    """attn1.to_k reads the image tokens, attn2.to_k the text tokens: as separate roles their chains never mix
    the two, so no chain splits at the first forward for that reason (each 8-wide chain is of one resolution
    here); later forwards give the same outputs, and every block but the first of its chain has a previous one."""
    spec = UNET
    model = spec.wrap(variant, pre_num=2)
    randomize(model, seed=6)
    before = chains_of(model)
    inputs = spec.inputs()
    with torch.no_grad():
        first = spec.output(model, inputs)
        second = spec.output(model, inputs)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert chains_of(model) == before
    for chain in model.chains:
        assert [len(layer.prev) > 0 for layer in chain.layers] == [False] + [True] * (len(chain.layers) - 1)
    assert model._slot.current is None


# ---- per-forward state: twice, no_grad, exceptions, checkpointing ---------------------------------------
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL)
def test_twice_and_no_grad_give_the_same_outputs_and_gradients(name, variant):
    spec = SPECS[name]
    model = spec.wrap(variant, pre_num=2)
    randomize(model, seed=7, a_scale=0.3)
    model.train()
    x1, x2 = spec.inputs(1), spec.inputs(2)

    def loss(out):
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()

    out1 = spec.output(model, x1)
    assert model._slot.current is None
    loss(out1).backward()
    g1 = _grads(model)
    model.zero_grad()
    loss(spec.output(model, x2)).backward()
    g2 = _grads(model)
    model.zero_grad()

    again = spec.output(model, x1)
    with torch.no_grad():
        nograd = spec.output(model, x1)
    assert model._slot.current is None and model._slot.depth == 0
    torch.testing.assert_close(again, out1, atol=0, rtol=0)
    torch.testing.assert_close(nograd, out1, atol=0, rtol=0)

    # two calls in one step: the gradient is the sum of the two separate gradients
    (loss(spec.output(model, x1)) + loss(spec.output(model, x2))).backward()
    both = _grads(model)
    assert any(g.abs().max() > 0 for g in g1.values())
    for k in both:
        torch.testing.assert_close(both[k], g1[k] + g2[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_state_survives_a_forward_that_raised(variant):
    spec = TOY
    model = spec.wrap(variant, pre_num=2)
    randomize(model)
    x = spec.inputs()["x"]
    want = model(x)
    layer = model.base_model.blocks[2].proj

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layer.base_layer.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    assert model._slot.current is None and model._slot.depth == 0
    handle.remove()
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert model._slot.current is None


def test_state_does_not_leak_between_models():
    spec = ToySpec((6, 6, 6, 6))
    a, b = spec.wrap("ms", pre_num=-1), spec.wrap("ms", pre_num=-1)
    randomize(a, seed=1)
    randomize(b, seed=2)
    x = spec.inputs()["x"]
    want_a, want_b = a(x), b(x)
    # b runs inside a's forward (between a's blocks): each keeps its own per-forward state
    seen = {}

    def run_b(module, args, output):
        seen["b"] = b(x)

    handle = a.base_model.blocks[1].register_forward_hook(run_b)
    got_a = a(x)
    handle.remove()
    torch.testing.assert_close(got_a, want_a, atol=0, rtol=0)
    torch.testing.assert_close(seen["b"], want_b, atol=0, rtol=0)
    assert a._slot is not b._slot and a._slot.current is None and b._slot.current is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_outputs_gradients_and_statistics(variant):
    spec = LLAMA_ALL
    plain, ckpt = spec.wrap(variant, pre_num=2), spec.wrap(variant, pre_num=2)
    randomize(plain, seed=8, a_scale=0.3)
    copy_adapter(plain, ckpt)
    ckpt.gradient_checkpointing_enable()
    runs = {"plain": 0, "ckpt": 0}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        probe = model.base_model.model.layers[1].self_attn.q_proj.base_layer
        probe.register_forward_hook(lambda m, i, o, key=key: runs.__setitem__(key, runs[key] + 1))
    plain.train()
    ckpt.train()
    inputs = spec.inputs()
    outs = {}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        out = spec.output(model, inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert model._slot.current is None and model._slot.depth == 0
        outs[key] = out.detach()
    assert runs == {"plain": 1, "ckpt": 2}  # the checkpointed block really was recomputed
    torch.testing.assert_close(outs["ckpt"], outs["plain"], atol=1e-6, rtol=1e-6)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert set(g_plain) == set(g_ckpt)
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], atol=1e-6, rtol=1e-5)
    if variant in ("is", "ms"):
        for name, layer in ckpt.named_reslora_layers().items():
            assert int(layer.stat_count) == 1, name  # not recorded again by the recomputation
            other = plain.named_reslora_layers()[name]
            torch.testing.assert_close(layer.mean_norms()[0], other.mean_norms()[0])
            torch.testing.assert_close(layer.mean_norms()[1], other.mean_norms()[1])


def test_use_reentrant_true_is_refused():
    model = LLAMA.wrap("is")
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


# ---- save / load ---------------------------------------------------------------------------------------
def _prepare(spec, variant, modules_to_save=()):
    model = spec.wrap(variant, pre_num=2, window=4, modules_to_save=list(modules_to_save))
    randomize(model, seed=9, a_scale=0.3)
    if modules_to_save:
        with torch.no_grad():
            model.base_model.classifier.weight.mul_(-2.0).add_(0.1)
    train_forwards(spec, model, n=3)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(tmp_path, name, variant):
    spec = SPECS[name]
    extra = ["classifier"] if name == "bert" else []
    model = _prepare(spec, variant, extra)
    model.save_adapter(tmp_path)
    loaded = ResLoraModel.from_pretrained(spec.build(), tmp_path)
    assert loaded.reslora_config == model.reslora_config
    assert chains_of(loaded) == chains_of(model)  # also the splits found at run time (UNet)
    for (n1, l1), (n2, l2) in zip(model.named_reslora_layers().items(), loaded.named_reslora_layers().items()):
        assert n1 == n2
        assert [loaded_name(loaded, p) for p in l2.prev] == [loaded_name(model, p) for p in l1.prev]
        if variant in ("is", "ms"):
            for a, b in zip(l1.mean_norms(), l2.mean_norms()):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            assert int(l1.stat_count) == int(l2.stat_count) == 3
    if extra:
        torch.testing.assert_close(loaded.base_model.classifier.weight, model.base_model.classifier.weight)
        assert loaded.base_model.classifier.weight.requires_grad
    inputs = spec.inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(spec.output(loaded, inputs), spec.output(model, inputs), atol=1e-6, rtol=1e-6)
    for mode in ("plain", "merge_bi", "merge_bw"):
        want = {loaded_name(model, l): w for l, w in merged_weights(model, mode).items()}
        got = {loaded_name(loaded, l): w for l, w in merged_weights(loaded, mode).items()}
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def loaded_name(model, layer):
    return next(n for n, m in model.named_reslora_layers().items() if m is layer)


@pytest.mark.parametrize("variant", ["lora", "is"])
def test_load_into_a_base_with_other_shapes_names_the_tensor(tmp_path, variant):
    model = _prepare(BERT, variant)
    model.save_adapter(tmp_path)
    saved = model.adapter_state_dict()
    other = get_reslora_model(BertSpec(hidden_size=24).build(), ResLoraConfig.load(tmp_path))
    expected = other.adapter_state_dict()
    mismatched = [k for k in saved if k in expected and saved[k].shape != expected[k].shape]
    assert mismatched
    with pytest.raises(ValueError) as info:
        ResLoraModel.from_pretrained(BertSpec(hidden_size=24).build(), tmp_path)
    assert any(k in str(info.value) for k in mismatched), str(info.value)


def test_loading_a_directory_without_adapter_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        ResLoraModel.from_pretrained(TOY.build(), tmp_path)


@pytest.mark.parametrize("variant", ["is", "bs"])
def test_an_adapter_whose_chains_cross_stacks_is_refused(tmp_path, variant):
    """An older adapter (reslora_config.json and chains.json) of an encoder-decoder, from when a chain grouped the
    layers by their last name only: its chains run from the encoder into the decoder, which chain apart now. Loading
    it with today's chains would give another model than the one trained, so the load is refused, naming the
    chains that differ, and the base model is left as it was."""
    model = _prepare(SPECS["t5"], variant)
    model.save_adapter(tmp_path)
    legacy: dict[str, list[str]] = {}
    for name in model.named_reslora_layers():  # registration order: the encoder's blocks, then the decoder's
        legacy.setdefault(name.split(".")[-1], []).append(name)
    assert any(len({n.split(".")[0] for n in names}) == 2 for names in legacy.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["chains"]
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "reslora_config.json").write_text(json.dumps(config))
    (tmp_path / "chains.json").write_text(json.dumps(list(legacy.values())))
    base = SPECS["t5"].build()
    names = [n for n, _ in base.named_modules()]
    encoder = [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)]
    with pytest.raises(ValueError, match=re.escape(f"chain {legacy['q']} is not a piece of the chain built here for "
                                                   f"{encoder[0]!r} ({encoder})")):
        ResLoraModel.from_pretrained(base, tmp_path)
    assert [n for n, _ in base.named_modules()] == names


# ---- configuration errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,pattern", [
    ({"variant": "xs"}, "variant"),
    ({"variant": "LoRA"}, "variant"),
    ({"r": 0}, "r="),
    ({"r": -2}, "r="),
    ({"pre_num": -2}, "pre_num"),
    ({"window": 0}, "window"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"target_modules": []}, "target_modules"),
])
def test_config_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ResLoraConfig(**kwargs)


def test_config_accepts_valid_values():
    for variant in VARIANTS:
        for pre_num in (-1, 0, 3):
            cfg = ResLoraConfig(variant=variant, r=1, pre_num=pre_num)
            assert cfg.scaling == pytest.approx(16.0)


def test_target_modules_matching_nothing_lists_the_linear_layers():
    with pytest.raises(ValueError) as info:
        get_reslora_model(BERT.build(), ResLoraConfig(target_modules=["q_proj"]))
    message = str(info.value)
    assert "q_proj" in message
    for linear in ("query", "key", "value", "dense", "classifier"):
        assert re.search(rf"\b{linear}\b", message), message


def test_target_modules_match_whole_suffixes_only():
    # a list entry matches a whole dotted suffix; a string is a regex on the whole name
    model = get_reslora_model(BERT.build(), ResLoraConfig(target_modules=["self.query"]))
    assert sorted(model.named_reslora_layers()) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(3)]
    regex = get_reslora_model(BERT.build(), ResLoraConfig(target_modules=r".*layer\.[01]\.attention\.self\.value"))
    assert sorted(regex.named_reslora_layers()) == [f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)]


def _unet_with_equal_widths():
    """Attention in the last down block, the middle block and the first up block, all 16 wide: one chain per
    target name runs down -> mid -> up, while diffusers registers up_blocks before mid_block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_order_makes_chains_follow_the_order_blocks_run(variant):
    """Without layer_order, the down, mid and up blocks chain apart, each in the order its blocks run (diffusers
    registers up_blocks before mid_block, so registration order across them would be wrong); with it, they are
    one stream in the order given."""
    inputs = UNET.inputs()
    config = dict(variant=variant, r=2, pre_num=2, target_modules=["to_q", "to_out.0"])
    unordered = get_reslora_model(_unet_with_equal_widths(), ResLoraConfig(**config))
    assert {tuple(n.split(".")[0] for n in names) for names in chains_of(unordered)} == {
        ("down_blocks",), ("mid_block",), ("up_blocks",) * 2}
    randomize(unordered, seed=3)
    with torch.no_grad():
        unordered(**inputs)
    model = get_reslora_model(_unet_with_equal_widths(),
                              ResLoraConfig(**config, layer_order=["down_blocks", "mid_block", "up_blocks"]))
    randomize(model, seed=3)
    with torch.no_grad():
        first, second = model(**inputs).sample, model(**inputs).sample
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    to_q = next(c for c in model.chains if c.names[0].endswith("attn1.to_q"))
    blocks = [n.split(".")[0] for n in to_q.names]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index) and "mid_block" in blocks
    with pytest.raises(ValueError, match="layer_order="):
        ResLoraConfig(layer_order=["down_blocks", ""])
