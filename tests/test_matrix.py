"""A PEFT-style matrix: tiny random models of the common architectures (built offline from their config classes) x
the four variants. Each cell trains two optimiser steps, then checks that merging is exact where the method says so,
that ``merged(mode)`` is ``merge_and_unload(mode)``, that the adapter reloads under another seed, and that the PEFT
export loads into PEFT and gives the merged model. Then what is particular to some of them: encoder-decoders chain
their stacks apart and generate, GPT-2's Conv1D, ``"all-linear"``, an ``nn.Sequential`` MLP."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _models import SPECS, VARIANTS, block_template, chains_of, expected_chains, randomize
from reslora import ResLoraConfig, ResLoraLinear, ResLoraModel, get_reslora_model, merged_weights

MATRIX = ["llama", "gpt2", "t5", "bart", "vit", "distilbert", "unet", "mlp"]
MODES = ("plain", "merge_bi", "merge_bw")
EXACT = {"lora": MODES, "bs": ("merge_bi", "merge_bw")}  # merges that equal the unmerged model (plain drops bs's sum)


def _cells():
    for name in MATRIX:
        marks = ([pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")]
                 if name == "unet" else [])
        for variant in VARIANTS:
            yield pytest.param(name, variant, marks=marks, id=f"{name}-{variant}")


def train_two_steps(spec, model) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(2):
        out = spec.output(model, spec.inputs(step))
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("name,variant", list(_cells()))
def test_matrix(tmp_path, name, variant):
    from peft import PeftModel

    spec = SPECS[name]
    model = spec.wrap(variant, pre_num=-1)
    assert max(len(chain.layers) for chain in model.chains) >= 2
    train_two_steps(spec, model)
    names = {layer: name for name, layer in model.named_reslora_layers().items()}
    assert all(layer.lora_B.abs().max() > 0 for layer in names)
    inputs = spec.inputs(5)
    fresh = spec.build()
    with torch.no_grad():
        unmerged = spec.output(model, inputs)
        assert (unmerged - spec.output(fresh, inputs)).abs().max() > 1e-3  # 100x the tolerances below
        want = {}
        for mode in MODES:
            plain = model.merge_and_unload(mode)
            assert [type(m) for m in plain.modules()] == [type(m) for m in fresh.modules()]
            for layer, weight in merged_weights(model, mode).items():  # W* in the base's own layout (Conv1D: in x out)
                assert torch.equal(plain.get_submodule(names[layer]).weight, weight)
            want[mode] = spec.output(plain, inputs)
            if mode in EXACT.get(variant, ()):
                torch.testing.assert_close(want[mode], unmerged, atol=1e-5, rtol=1e-5)
            with model.merged(mode):
                torch.testing.assert_close(spec.output(model, inputs), want[mode], atol=0, rtol=0)
        if variant == "bs":  # the residual sum matters, so the exactness above means something
            assert (want["plain"] - unmerged).abs().max() > 1e-5

    # save / load into a fresh base while the RNG is elsewhere: everything comes from the files
    model.save_adapter(tmp_path / "adapter")
    torch.manual_seed(1234)
    loaded = ResLoraModel.from_pretrained(fresh, tmp_path / "adapter")
    assert chains_of(loaded) == chains_of(model)
    with torch.no_grad():
        torch.testing.assert_close(spec.output(loaded, inputs), unmerged, atol=1e-6, rtol=1e-6)
        with loaded.merged("merge_bi"):  # is, ms: from the saved statistics
            torch.testing.assert_close(spec.output(loaded, inputs), want["merge_bi"], atol=1e-6, rtol=1e-6)

    model.export_peft_adapter(tmp_path / "peft", "merge_bi")
    peft_model = PeftModel.from_pretrained(spec.build(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(spec.output(peft_model, inputs), want["merge_bi"], atol=1e-5, rtol=1e-5)


# ---- chains: the model's layer sequence, never across stacks ----------------------------------------------
@pytest.mark.parametrize("name", ["t5", "bart", "gpt2", "vit", "distilbert", "llama_all", "mlp"])
def test_chains_are_the_blocks_of_one_stack(name):
    spec = SPECS[name]
    model = spec.wrap("ms", pre_num=-1)
    shapes = [(n, (l.in_features, l.out_features)) for n, l in model.named_reslora_layers().items()]
    assert chains_of(model) == sorted(expected_chains(shapes, block_template))
    if name in ("t5", "bart"):  # both stacks are adapted, and no chain runs from one into the other
        assert {"encoder." in n for c in model.chains for n in c.names} == {True, False}
        for chain in model.chains:
            assert len({"encoder." in n for n in chain.names}) == 1
    if name == "mlp":  # an nn.Sequential of linears chains along its index where shapes allow
        assert chains_of(model) == [["0"], ["2", "4"], ["6"]]


@pytest.mark.parametrize("variant", ["is", "ms"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_and_decoder_of_other_lengths_keep_their_chains(name, variant):
    """The decoder's first block reads nothing of the encoder's (its input has another length): no chain splits at
    run time, and the same input gives the same output after forwards of other lengths."""
    spec = SPECS[name]
    model = spec.wrap(variant, pre_num=2)
    randomize(model, seed=1, a_scale=0.3)
    before = chains_of(model)
    inputs = spec.inputs(0)
    with torch.no_grad():
        first = spec.output(model, inputs)
        spec.output(model, {**inputs, "decoder_input_ids": inputs["input_ids"]})  # equal lengths
        again = spec.output(model, inputs)
    assert chains_of(model) == before
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_generate_on_encoder_decoders(name, variant):
    """generate() runs the encoder alone, then the decoder step by step with a cache: each step's logits are those
    of one full forward of the model on the tokens so far."""
    spec = SPECS[name]
    model = spec.wrap(variant, pre_num=2)
    randomize(model, seed=2, a_scale=0.3)
    inputs = {k: v for k, v in spec.inputs(1).items() if k != "decoder_input_ids"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert model._slot.current is None and model._slot.depth == 0
        for step, logits in enumerate(out.logits):
            full = model(**inputs, decoder_input_ids=out.sequences[:, :step + 1]).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_a_variant_without_any_chain_is_refused_and_leaves_the_base_model_as_it_was():
    from _models import ToySpec

    spec = ToySpec((6, 4, 6, 4))  # proj shapes alternate: every chain has one block
    spec.wrap("lora")
    for variant in ("is", "bs", "ms"):
        base = spec.build()
        with pytest.raises(ValueError, match=rf"variant='{variant}' found no chain longer than one block"):
            get_reslora_model(base, spec.config(variant))
        assert not any(isinstance(m, ResLoraLinear) for m in base.modules())
        assert all(p.requires_grad for p in base.parameters())


class Shrinking(torch.nn.Module):
    """Two equal linears whose inputs have different lengths: one chain by names and shapes, split at run time."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        return self.layers[1](self.layers[0](x)[:, :2])


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_a_run_time_split_that_leaves_no_chain_warns(variant):
    model = get_reslora_model(Shrinking(), ResLoraConfig(variant=variant, r=2, target_modules=["layers.0", "layers.1"]))
    assert chains_of(model) == [["layers.0", "layers.1"]]
    with pytest.warns(UserWarning, match="no chain is longer than one block"):
        model(torch.randn(2, 3, 4))
    assert chains_of(model) == [["layers.0"], ["layers.1"]]


# ---- targets: Conv1D and "all-linear" ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "distilbert", "bert", "vit", "t5", "mlp"])
def test_all_linear_targets_what_peft_targets(name):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    spec = SPECS[name]
    ours = get_reslora_model(spec.build(), ResLoraConfig(target_modules="all-linear"))
    peft_config = LoraConfig(target_modules="all-linear", task_type=ours.reslora_config.task_type)
    theirs = _maybe_include_all_linear_layers(peft_config, spec.build()).target_modules  # PEFT's own resolution
    assert set(ours.named_reslora_layers()) == set(theirs) and theirs


def test_gpt2_conv1d_merges_into_conv1d_layers_with_their_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    spec = SPECS["gpt2"]
    model = spec.wrap("bs", pre_num=-1)
    randomize(model, seed=3, a_scale=0.3)
    plain = model.merge_and_unload("merge_bi")
    for name, layer in model.named_reslora_layers().items():
        assert layer.fan_in_fan_out and isinstance(plain.get_submodule(name), Conv1D)
        update = layer.scaling * sum(b.lora_B @ b.lora_A for b in (layer, *layer.prev))  # out x in
        torch.testing.assert_close(plain.get_submodule(name).weight, layer.weight + update.T, atol=1e-6, rtol=1e-6)


def test_whisper_peft_export_takes_a_task_type(tmp_path):
    from peft import PeftModel
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    def build():
        torch.manual_seed(0)
        return WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=40, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()

    model = get_reslora_model(build(), ResLoraConfig(variant="is", r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, seed=4)
    features = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    inputs = {"input_features": features, "decoder_input_ids": torch.tensor([[1, 5, 6]])}
    with torch.no_grad():
        want = model.merge_and_unload("merge_bw")(**inputs).logits
    model.export_peft_adapter(tmp_path, "merge_bw", task_type=None)
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, want, atol=1e-5, rtol=1e-5)
    assert model.reslora_config.task_type == "SEQ_2_SEQ_LM"  # the adapter's own is unchanged

