"""A ResLoRA model inside transformers.Trainer under default TrainingArguments: dataset columns kept, labels
found, eval_loss reported, activation checkpointing with the residual paths; save_pretrained writes the adapter."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from _models import BERT
from reslora import ResLoraModel, get_reslora_model


def dataset(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, 7), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 7] * n,
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def trainer(model, tmp_path, **kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, **kwargs)
    return Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(8))


def test_the_wrapper_shows_the_base_models_forward_signature():
    model = get_reslora_model(BERT.build(), BERT.config("bs"))
    assert isinstance(model, ResLoraModel)
    assert inspect.signature(model.forward) == inspect.signature(model.base_model.forward)
    assert "labels" in inspect.signature(type(model).forward).parameters


@pytest.mark.parametrize("variant", ["is", "bs", "ms"])
def test_trainer_trains_and_evaluates_with_default_arguments(tmp_path, variant):
    model = get_reslora_model(BERT.build(), BERT.config(variant, modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = trainer(model, tmp_path)
    run.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before and "lora_B" in n)
    metrics = run.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0


def test_trainer_gradient_checkpointing_keeps_the_residual_paths(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("is"))
    trainer(model, tmp_path, gradient_checkpointing=True).train()  # raised "outside a forward" before
    assert model.base_model.is_gradient_checkpointing


def test_save_pretrained_writes_the_adapter_and_from_pretrained_reloads_it(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("ms"))
    trainer(model, tmp_path).train()
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    loaded = ResLoraModel.from_pretrained(BERT.build(), tmp_path / "adapter")
    inputs = BERT.inputs(seed=4)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(BERT.output(model, inputs), BERT.output(loaded, inputs))


def test_resume_from_a_trainer_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = get_reslora_model(BERT.build(), BERT.config("ms"))
    trainer(straight, tmp_path / "a", save_steps=2).train()
    resumed = get_reslora_model(BERT.build(), BERT.config("ms"))
    trainer(resumed, tmp_path / "a", save_steps=2).train(resume_from_checkpoint=str(tmp_path / "a/out/checkpoint-2"))
    inputs = BERT.inputs(seed=1)
    straight.eval(), resumed.eval()
    with torch.no_grad():
        assert torch.equal(BERT.output(straight, inputs), BERT.output(resumed, inputs))
    stats = [n for n, _ in straight.named_buffers() if n.endswith("input_norms")]
    assert stats and all(torch.equal(straight.get_buffer(n), resumed.get_buffer(n)) for n in stats)


def test_the_adapter_files_are_conventional_and_carry_the_merge_ls_fit(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("is", base_model_name_or_path="org/tiny-bert"))
    trainer(model, tmp_path).train()
    model.fit_merge_ls([BERT.inputs(seed=2)])
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RESLORA" and config["task_type"] == "SEQ_CLS" and config["variant"] == "is"
    assert config["base_model_name_or_path"] == "org/tiny-bert" and config["library"] == "reslora"
    assert config["chains"] == [list(c.names) for c in model.chains] and config["library_version"]
    loaded = ResLoraModel.from_pretrained(BERT.build(), tmp_path / "adapter")
    inputs = BERT.inputs(seed=5)
    model.eval(), loaded.eval()
    with torch.no_grad():  # the merge_ls fit came back with the adapter
        assert torch.equal(BERT.output(model.merge_and_unload("merge_ls"), inputs),
                           BERT.output(loaded.merge_and_unload("merge_ls"), inputs))


def test_an_adapter_saved_in_the_older_layout_still_loads(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("bs"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "chains.json").write_text(json.dumps(config.pop("chains")))
    (tmp_path / "reslora_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                              if k not in ("peft_type", "library", "library_version",
                                                                           "task_type", "base_model_name_or_path")}))
    (tmp_path / "adapter_config.json").unlink()
    assert ResLoraModel.from_pretrained(BERT.build(), tmp_path).reslora_config == model.reslora_config


def test_a_name_that_is_neither_a_directory_nor_a_reachable_hub_repository_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = BERT.build()
    with pytest.raises(FileNotFoundError, match="neither a local adapter directory nor a hub repository"):
        ResLoraModel.from_pretrained(base, "no-such-org/no-such-adapter")


def test_a_trainer_checkpoint_holds_the_adapter_not_the_base_model(tmp_path):
    from safetensors.torch import load_file

    model = get_reslora_model(BERT.build(), BERT.config("bs", modules_to_save=["classifier"]))
    trainer(model, tmp_path, save_steps=2).train()
    saved = load_file(str(tmp_path / "out/checkpoint-2/model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(saved)
    assert all(n in trainable or n.endswith((".input_norms", ".ax_norms", ".stat_count")) or n == "_extra_state"
               for n in saved)
    assert len(saved) < len(model.base_model.state_dict())  # the frozen base weights stay out


@pytest.mark.parametrize("variant", ["lora", "ms"])
def test_a_trainer_checkpoint_and_save_model_output_load_with_from_pretrained(tmp_path, variant):
    model = get_reslora_model(BERT.build(), BERT.config(variant, modules_to_save=["classifier"]))
    run = trainer(model, tmp_path, save_steps=2)
    run.train()
    run.save_model(str(tmp_path / "final"))
    inputs = BERT.inputs(seed=3)
    model.eval()
    for directory in (tmp_path / "final", tmp_path / "out/checkpoint-2"):
        loaded = ResLoraModel.from_pretrained(BERT.build(), directory).eval()
        assert loaded.reslora_config == model.reslora_config
        with torch.no_grad():
            same = torch.equal(BERT.output(model, inputs), BERT.output(loaded, inputs))
        assert same == (directory.name == "final")  # the checkpoint is the adapter at step 2, before step 3
    final = ResLoraModel.from_pretrained(BERT.build(), tmp_path / "final")
    with torch.no_grad():  # the merge statistics came back with it
        assert torch.equal(BERT.output(model.merge_and_unload("merge_bi"), inputs),
                           BERT.output(final.merge_and_unload("merge_bi"), inputs))


def test_load_best_model_at_end_restores_the_adapter_of_the_best_checkpoint(tmp_path):
    model = get_reslora_model(BERT.build(), BERT.config("ms", modules_to_save=["classifier"]))
    # "best" is the highest eval loss, an early checkpoint, so that restoring it shows (training lowers the loss)
    run = trainer(model, tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                  metric_for_best_model="loss", greater_is_better=True)
    run.train()
    assert run.state.best_global_step < run.state.global_step
    best = ResLoraModel.from_pretrained(BERT.build(), run.state.best_model_checkpoint).adapter_state_dict()
    last = ResLoraModel.from_pretrained(BERT.build(), tmp_path / "out/checkpoint-3").adapter_state_dict()
    assert all(torch.equal(t, best[n]) for n, t in model.adapter_state_dict().items())
    assert not all(torch.equal(t, last[n]) for n, t in model.adapter_state_dict().items())


def test_resuming_from_the_checkpoint_of_another_config_is_refused_naming_what_differs(tmp_path):
    trainer(get_reslora_model(BERT.build(), BERT.config("ms")), tmp_path, save_steps=2).train()
    other = get_reslora_model(BERT.build(), BERT.config("is"))
    with pytest.raises(ValueError, match="another config .*variant: 'ms' saved, 'is' here"):
        trainer(other, tmp_path).train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))


def test_a_model_safetensors_that_is_not_a_reslora_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    base = BERT.build()
    with pytest.raises(ValueError, match="holds no ResLoRA adapter description"):
        ResLoraModel.from_pretrained(base, tmp_path)


def test_the_wrappers_state_dict_is_the_adapters_and_loads_strictly():
    model = get_reslora_model(BERT.build(), BERT.config("is"))
    state = model.state_dict()
    assert state and all("lora_" in n or n.endswith((".input_norms", ".ax_norms", ".stat_count"))
                         for n in state if n != "_extra_state")
    other = get_reslora_model(BERT.build(), BERT.config("is"))
    assert other.load_state_dict(state, strict=True).missing_keys == []
    with pytest.raises(RuntimeError, match="Missing key"):  # an adapter tensor left out is still missing
        other.load_state_dict({k: v for k, v in state.items() if not k.endswith("lora_A")}, strict=True)
    full = dict(model.base_model.state_dict())
    assert len(full) > len(state) and other.base_model.load_state_dict(full, strict=True).missing_keys == []


def test_the_trainer_example_runs_and_its_checkpoint_is_adapter_sized(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "trainer.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint, base = map(float, re.search(r"checkpoint: ([\d.]+) MiB of weights.*weights: ([\d.]+) MiB",
                                            done.stdout).groups())
    assert checkpoint < base / 50
    assert float(re.search(r"max \|logit difference\| ([\d.e+-]+)", done.stdout).group(1)) < 1e-5
