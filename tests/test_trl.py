"""A ResLoRA model inside TRL's plain SFTTrainer under SFTConfig's defaults: gradient checkpointing on, bf16 autocast
(accelerate's, around the forward), TRL's fused LM head; its checkpoints load with from_pretrained and resume exactly."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from _models import LLAMA, LlamaSpec, TokensSpec
from reslora import ResLoraModel

WORDS = "the a cat dog bird sat ran flew on to over mat park tree".split()
TEXTS = ["the cat sat on the mat", "a dog ran to the park", "the bird flew over a tree", "a cat ran to the tree"]
STEPS = 4
# Qwen2 ties its LM head to the input embeddings (as its small checkpoints do)
QWEN2 = TokensSpec("qwen2", "Qwen2ForCausalLM", "Qwen2Config", ["q_proj", "v_proj"], hidden_size=16,
                   intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=32, tie_word_embeddings=True, use_cache=False)


def tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' vocabulary (made here: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft(model, tmp_path, **kwargs) -> SFTTrainer:
    kwargs = {"max_steps": STEPS, "save_steps": 2, **kwargs}
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, **kwargs)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS * 2}),
                      processing_class=tokenizer())


def logits(model, spec=LLAMA, seed: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return spec.output(model, spec.inputs(seed))


def text_loss(model) -> float:
    """The model's loss on the training texts, in float32 (the same batch before and after training)."""
    batch = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


@pytest.mark.parametrize("spec, variant", [(LLAMA, "is"), (LLAMA, "bs"), (LLAMA, "ms"), (QWEN2, "ms")],
                         ids=["llama-is", "llama-bs", "llama-ms", "qwen2-ms"])
def test_plain_sft_trainer_trains_with_its_defaults_and_its_output_loads_with_from_pretrained(tmp_path, spec, variant):
    model = spec.wrap(variant)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = text_loss(model)
    run = sft(model, tmp_path)
    assert run.args.gradient_checkpointing  # SFTConfig's default
    run.train()
    assert model.base_model.is_gradient_checkpointing
    assert run.state.global_step == STEPS
    assert text_loss(model) < loss_before - 0.01
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # every A and B
    run.save_model(str(tmp_path / "final"))
    loaded = ResLoraModel.from_pretrained(spec.build(), tmp_path / "final")
    trained = model.adapter_state_dict()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in loaded.adapter_state_dict().items())
    checkpoint = ResLoraModel.from_pretrained(spec.build(), tmp_path / "out/checkpoint-2")
    assert checkpoint.reslora_config == model.reslora_config
    assert not torch.equal(logits(checkpoint, spec), logits(loaded, spec))  # step 2's adapter, not the last one
    # merged into plain transformers models that run their own forward (not TRL's head, nor accelerate's autocast)
    assert torch.equal(logits(loaded.merge_and_unload("merge_bi"), spec),
                       logits(model.merge_and_unload("merge_bi"), spec))
    if variant != "bs":  # the merge statistics were recorded (training forwards, not the recomputations) and saved
        assert {int(layer.stat_count) for layer in loaded.named_reslora_layers().values()} == {STEPS}


def test_under_sft_trainer_the_model_called_without_the_fused_head_computes_its_usual_logits(tmp_path):
    model = LLAMA.wrap("ms")
    sft(model, tmp_path, max_steps=1, bf16=False).train()  # no autocast: the same float32 computation both ways
    inputs = LLAMA.inputs(seed=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model.base_model(**inputs).logits)
        fused = model(**inputs, labels=inputs["input_ids"], fused_lm_head=True)
        plain = model(**inputs, labels=inputs["input_ids"])
    assert fused.loss.item() == pytest.approx(plain.loss.item(), rel=1e-4)  # TRL's head, on this model's logits


def test_sft_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = LLAMA.wrap("ms")
    sft(straight, tmp_path).train()
    resumed = LLAMA.wrap("ms")
    sft(resumed, tmp_path).train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))
    assert torch.equal(logits(straight.merge_and_unload("plain")), logits(resumed.merge_and_unload("plain")))
    assert all(torch.equal(b, resumed.get_buffer(n)) for n, b in straight.named_buffers() if n.endswith("_norms"))


def test_an_adapter_on_the_lm_head_is_refused_naming_the_fix(tmp_path):
    model = LlamaSpec(("q_proj", "lm_head")).wrap("bs")
    with pytest.raises(ValueError, match="remove the LM head from target_modules"):
        sft(model, tmp_path)


def test_only_trls_fused_head_is_rebound_any_other_forward_set_on_the_model_is_kept():
    model = LLAMA.wrap("is")
    model.forward = lambda *args, **kwargs: "mine"
    assert model(**LLAMA.inputs()) == "mine"


@pytest.mark.slow  # SmolLM2 (dequantised from its GGUF once, then cached under .cache/) and two SFT runs
def test_the_sft_example_trains_resumes_and_reloads_its_checkpoint(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "sft.py"), "--out", str(tmp_path)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)},  # this tree's reslora, not an installed one
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gradient checkpointing: True" in done.stdout
    first, last = map(float, re.search(r"train loss: step 1 ([\d.]+) -> step 8 ([\d.]+)", done.stdout).groups())
    assert last < first
    assert "adapter reloaded from checkpoint-8: identical to the trained one" in done.stdout
    assert "the base model's weights: 135 MiB" in done.stdout  # SmolLM2's tied LM head counted once
