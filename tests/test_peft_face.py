"""What a PEFT user reaches for: merging twice is refused while merged, disable_adapter() gives the base model,
PEFT's and transformers' adapter names do the adapter-level thing or say what to use, never act on the base
model; push_to_hub uploads the adapter alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _models import BERT, TOY, VARIANTS, randomize, train_forwards
from reslora import ResLoraModel, merged_weights


def trained(spec, variant):
    model = spec.wrap(variant, pre_num=2)
    randomize(model, a_scale=0.3)
    train_forwards(spec, model, n=2)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {n: layer.weight.detach().clone() for n, layer in model.named_reslora_layers().items()}


# ---- merging twice -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("second", ["merged", "merge_and_unload", "merged_weights", "export", "calibrate",
                                    "fit_merge_ls", "disable_adapters"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merging_again_inside_merged_is_refused(tmp_path, variant, second):
    spec = TOY
    model = trained(spec, variant)
    before = weights(model)
    inputs = spec.inputs(4)
    with torch.no_grad():
        want = spec.output(model.merge_and_unload("plain"), inputs)
    again = {"merged": lambda: model.merged("plain").__enter__(), "merge_and_unload": lambda: model.merge_and_unload(),
             "merged_weights": lambda: merged_weights(model, "plain"),
             "export": lambda: model.export_peft_adapter(tmp_path, "plain"),
             "calibrate": lambda: model.calibrate([inputs]), "fit_merge_ls": lambda: model.fit_merge_ls([inputs]),
             "disable_adapters": model.disable_adapters}[second]
    with model.merged("plain"):
        with pytest.raises(RuntimeError, match=r"inside `with model.merged\(...\)`.*twice"):
            again()
        with torch.no_grad():  # still merged once
            torch.testing.assert_close(spec.output(model, inputs), want, atol=1e-12, rtol=0)
    for name, weight in weights(model).items():
        assert torch.equal(weight, before[name]), name
    assert not any(layer.merged_in_place or layer.disabled for layer in model.named_reslora_layers().values())
    model.merge_and_unload("plain")  # possible again once the block is left


# ---- disable_adapter ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_disable_adapter_gives_the_base_model_and_restores_the_adapter(variant):
    spec = BERT
    model = trained(spec, variant)
    stats = {n: int(getattr(layer, "stat_count", 0)) for n, layer in model.named_reslora_layers().items()}
    inputs = spec.inputs(3)
    base = spec.build()
    model.train()
    with torch.no_grad():
        adapted = spec.output(model, inputs)
        with model.disable_adapter():
            disabled = spec.output(model, inputs)
            with pytest.raises(RuntimeError, match="disabled"):
                model.merged("plain").__enter__()
        again = spec.output(model, inputs)
        want = spec.output(base, inputs)
    torch.testing.assert_close(disabled, want, atol=1e-6, rtol=1e-6)
    assert (adapted - want).abs().max() > 1e-4  # the adapter matters, so the check above means something
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)
    # the disabled forward recorded no statistics (the two adapted ones did)
    assert all(int(getattr(l, "stat_count", 0)) == stats[n] + 2 * (variant in ("is", "ms"))
               for n, l in model.named_reslora_layers().items())


def test_disable_adapters_and_enable_adapters():
    spec = TOY
    model = trained(spec, "ms")
    inputs = spec.inputs(1)
    with torch.no_grad():
        adapted = spec.output(model, inputs)
        model.disable_adapters()
        with model.disable_adapter():
            pass
        torch.testing.assert_close(spec.output(model, inputs), spec.output(spec.build(), inputs), atol=0, rtol=0)
        model.enable_adapters()
        torch.testing.assert_close(spec.output(model, inputs), adapted, atol=0, rtol=0)
    with pytest.raises(ValueError, match="boom"):
        with model.disable_adapter():
            raise ValueError("boom")
    assert not any(layer.disabled for layer in model.named_reslora_layers().values())


# ---- PEFT's names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,alternative", [
    ("add_adapter", "get_reslora_model"), ("set_adapter", "exactly one adapter"),
    ("delete_adapter", "exactly one adapter"), ("active_adapters", "exactly one adapter"),
    ("add_weighted_adapter", "exactly one adapter"), ("peft_config", "reslora_config"),
    ("get_adapter_state_dict", "adapter_state_dict"), ("merge_adapter", "merged"), ("unmerge_adapter", "merged"),
    ("enable_adapter_layers", "enable_adapters"), ("disable_adapter_layers", "disable_adapters"),
    ("get_nb_trainable_parameters", "trainable_parameters")])
def test_peft_names_say_what_to_use_instead_of_reaching_the_base_model(name, alternative):
    model = BERT.wrap("bs")
    assert hasattr(model.base_model, name) or name in ("add_weighted_adapter", "peft_config", "merge_adapter",
                                                        "unmerge_adapter", "enable_adapter_layers",
                                                        "disable_adapter_layers", "get_nb_trainable_parameters")
    with pytest.raises(AttributeError, match=alternative):
        getattr(model, name)
    assert not hasattr(model, name)  # tools that probe for PEFT see no PEFT model


def test_peft_names_that_work():
    model = BERT.wrap("is")
    assert model.get_base_model() is model.base_model
    assert model.base_model.config is model.config  # other names still reach the base model


def test_push_to_hub_uploads_the_adapter_that_from_pretrained_loads(tmp_path, monkeypatch):
    import huggingface_hub

    uploads = {}

    class FakeApi:
        def __init__(self, token=None):
            uploads["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads["create"] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message, revision, create_pr):
            uploads["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            for path in Path(folder_path).iterdir():
                (tmp_path / path.name).write_bytes(path.read_bytes())
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    spec = BERT
    model = trained(spec, "ms")
    assert model.push_to_hub("someone/adapter", private=True, token="t") == "commit"
    assert uploads["create"] == ("someone/adapter", True, True) and uploads["token"] == "t"
    assert uploads["files"] == ["adapter_config.json", "adapter_model.safetensors"]  # no base model weights
    loaded = ResLoraModel.from_pretrained(spec.build(), tmp_path)
    model.eval()
    inputs = spec.inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(spec.output(loaded, inputs), spec.output(model, inputs), atol=0, rtol=0)


# ---- the statistics trap -----------------------------------------------------------------------------------
def test_missing_statistics_error_names_train_mode():
    spec = TOY
    model = spec.wrap("is")
    randomize(model)
    model.eval()  # what from_pretrained returns: training forwards in eval mode record nothing
    spec.output(model, spec.inputs(0)).sum().backward()
    with pytest.raises(RuntimeError, match=r"train mode.*model\.train\(\).*calibrate"):
        model.merge_and_unload("merge_bi")
