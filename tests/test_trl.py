"""A ResLoRA model inside TRL's SFTTrainer (reslora.trl.ResLoraSFTTrainer) under SFTConfig's defaults: gradient
checkpointing on, TRL's fused LM head; its checkpoints load with from_pretrained and resume exactly."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig

from _models import LLAMA, LlamaSpec
from reslora import ResLoraModel
from reslora.trl import ResLoraSFTTrainer

WORDS = "the a cat dog bird sat ran flew on to over mat park tree".split()
TEXTS = ["the cat sat on the mat", "a dog ran to the park", "the bird flew over a tree", "a cat ran to the tree"]


def tokenizer():
    """A word-level tokenizer whose ids fit the tiny LLaMA's vocabulary (made here: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft(model, tmp_path, **kwargs) -> ResLoraSFTTrainer:
    kwargs = {"max_steps": 3, "save_steps": 2, **kwargs}
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, **kwargs)
    return ResLoraSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS * 2}),
                             processing_class=tokenizer())


def logits(model, seed: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return LLAMA.output(model, LLAMA.inputs(seed))


@pytest.mark.parametrize("variant", ["is", "bs", "ms"])
def test_sft_trainer_trains_with_its_defaults_and_its_output_loads_with_from_pretrained(tmp_path, variant):
    model = LLAMA.wrap(variant)
    run = sft(model, tmp_path)
    assert run.args.gradient_checkpointing  # SFTConfig's default
    run.train()
    assert model.base_model.is_gradient_checkpointing
    assert all(layer.lora_B.abs().sum() > 0 for layer in model.named_reslora_layers().values())
    run.save_model(str(tmp_path / "final"))
    loaded = ResLoraModel.from_pretrained(LLAMA.build(), tmp_path / "final")
    trained = model.adapter_state_dict()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in loaded.adapter_state_dict().items())
    checkpoint = ResLoraModel.from_pretrained(LLAMA.build(), tmp_path / "out/checkpoint-2")
    assert checkpoint.reslora_config == model.reslora_config
    # merged into plain LlamaForCausalLMs that run their own forward (not TRL's head, nor accelerate's autocast)
    assert torch.equal(logits(loaded.merge_and_unload("merge_bi")), logits(model.merge_and_unload("merge_bi")))
    if variant != "bs":  # the merge statistics were recorded (training forwards, not the recomputations) and saved
        assert {int(layer.stat_count) for layer in loaded.named_reslora_layers().values()} == {3}


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


@pytest.mark.slow  # SmolLM2 (dequantised from its GGUF once, then cached under .cache/) and two SFT runs
def test_the_sft_example_trains_resumes_and_reloads_its_checkpoint(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "sft.py"), "--out", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gradient checkpointing: True" in done.stdout
    first, last = map(float, re.search(r"train loss: step 1 ([\d.]+) -> step 8 ([\d.]+)", done.stdout).groups())
    assert last < first
    assert "adapter reloaded from checkpoint-8: identical to the trained one" in done.stdout
