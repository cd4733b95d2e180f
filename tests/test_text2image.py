"""Text-to-image (Fig. 3): a base pretrained on plain digits, a style to learn, judges of style and content, and the
pipeline end to end at smoke scale (a plumbing test, no metric)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reslora.lab.assets import committed_hashes, file_sha256
from reslora.lab.tasks.text2image import base_weights_name, check_base, judges_name, target_captions
from test_platform import ROOT, record as published_record, train

JUDGE_EPOCHS = OmegaConf.load(ROOT / "conf" / "task" / "text2image.yaml").judge_epochs
from test_reports import execute_notebook

sys.path.insert(0, str(ROOT / "experiments"))
from gpu_check import tiny_stable_diffusion  # noqa: E402  a tiny random SD checkpoint, as the GPU check uses


def test_captions_name_the_digit():
    assert target_captions()[7] == "a drawing of the digit seven" and len(target_captions()) == 10


def test_a_cached_base_built_with_other_settings_is_refused(tmp_path):
    pretrain = OmegaConf.load(ROOT / "conf" / "model" / "t2i-small.yaml").pretrain
    (tmp_path / "base.json").write_text(json.dumps({"args": {**pretrain, "name": "t2i-digits"}}))
    assert check_base(tmp_path, pretrain)["args"]["steps"] == pretrain.steps
    (tmp_path / "base.json").write_text(json.dumps({"args": {**pretrain, "steps": 3000}}))
    with pytest.raises(ValueError, match=r"'steps': \(3000, 6000\)"):
        check_base(tmp_path, pretrain)


@pytest.mark.slow  # pretrains a base and runs the Fig. 3 sweep: make test-slow
def test_fig3_pipeline_at_smoke_scale(tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # empty: the judges are committed (assets/), the base is built here
    subprocess.run([sys.executable, str(ROOT / "experiments" / "t2i_base.py"), "--cache", str(cache), "--scale",
                    "smoke"], check=True, cwd=ROOT, capture_output=True)
    base = json.loads((cache / "t2i" / "t2i-smoke-base" / "base.json").read_text())
    assert base["args"]["steps"] == 2 and len(base["loss"]) == 2
    base_sha256 = file_sha256(cache / base_weights_name("t2i-smoke-base"))
    judges = judges_name("thick", JUDGE_EPOCHS)

    train(tmp_path, "-m", "experiment=fig3_base", "scale=smoke_t2i", "hydra/launcher=joblib_cpu", cache=cache)
    train(tmp_path, "-m", "experiment=fig3", "scale=smoke_t2i", "seed=0", "hydra/launcher=joblib_cpu", cache=cache)
    results = tmp_path / "results"
    for method in ("lora", "reslora_is", "reslora_bs_pre5", "lora_alpha113", "lora_alpha73"):
        record = json.loads((results / f"records/smoke/fig3/text2image/{method}/seed0.json").read_text())
        assert record["status"] == "ok", record.get("error")
        assert record["headline_mode"] == "merge_bi" and set(record["final"]) == {"merge_bi", "unmerged", "merge_ls"}
        assert 0 <= record["headline"] <= 1 and record["assets"]["base"]["args"]["steps"] == 2
        assert record["assets"]["sha256"] == {base_weights_name("t2i-smoke-base"): base_sha256,
                                              judges: committed_hashes()[judges]}  # every asset it used
        items = record["predictions"]["merge_bi"]["test"]  # 10 prompts x test_samples_per_prompt (2)
        assert items["id"] == list(range(20)) and np.mean(items["correct"]) == record["headline"]
        assert record["final"]["merge_bi"]["test"]["style_score"] <= record["final"]["merge_bi"]["test"]["content_score"]
    bases = [json.loads(f.read_text()) for f in (results / "records/smoke/fig3/text2image").glob("zero_shot*/seed0.json")]
    assert sorted((b["config"]["task"]["guidance_scale"], b["config"]["task"]["sample_eta"]) for b in bases) == [
        (g, eta) for g in (1.0, 2.0, 3.0) for eta in (0.0, 1.0)]  # fig3_base's sweep: guidance x sampler
    assert all(b["status"] == "ok" and b["total_steps"] == 0 for b in bases)
    assert all(set(b["final"]["unmerged"]) == {"test"} and "content_score" in b["eval"][0]["validation"]
               for b in bases)  # the sampler is picked on validation
    subprocess.run([sys.executable, str(ROOT / "experiments" / "tables.py"), "fig3", "--scale", "smoke",
                    "--results", str(results)], check=True, cwd=ROOT)
    text = (results / "fig3_smoke.md").read_text()
    for row in ("LoRA (r=4) | merged", "ResLoRA_is | merged (merge_bi)", "ResLoRA_bs pre_num=5 |",
                "LoRA (alpha=113), control | merged", "LoRA (alpha=73), first control pick | merged", "ResLoRA_is |"):
        assert f"| {row}" in text, row
    assert "row − LoRA" in text and "row − control" in text and "Validation picks guidance_scale" in text
    for name in ("fig3_curves_smoke.png", "fig3_samples_smoke.png"):
        assert (results / "figures" / name).stat().st_size > 5_000
    assert "5 records; methods" in execute_notebook("fig3.ipynb", results, monkeypatch)  # and the base


@pytest.mark.slow  # the paper-scale path (make test-slow)
def test_stable_diffusion_path_with_a_tiny_checkpoint_and_a_local_captioned_set(tmp_path):
    from PIL import Image

    sd, images = tmp_path / "sd", tmp_path / "images"
    tiny_stable_diffusion(sd)
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}) + "\n")
    train(tmp_path, "-m", "experiment=fig3", "scale=smoke_t2i", "task=naruto", f"task.dataset={images}",
          "task.resolution=16", "task.max_caption_tokens=8", "model=sd2", f"model.path={sd}", "seed=0",
          "data.val_samples=2", "data.max_test_samples=2",
          "method=lora,reslora_is", "hydra/launcher=joblib_cpu")
    results = tmp_path / "results"
    record = published_record(tmp_path, task="naruto", method="reslora_is", tag="fig3")  # a variant cell: its overrides
    assert record["status"] == "ok", record.get("error")
    assert record["headline_metric"] == "neg_denoise_loss" and record["assets"]["classifier"] is None
    assert record["config"]["model"]["name"] == "sd2"
    assert record["data_sizes"] == {"validation": 2, "test": 2, "train": 8}
    subprocess.run([sys.executable, str(ROOT / "experiments" / "tables.py"), "fig3", "--scale", "smoke",
                    "--results", str(results)], check=True, cwd=ROOT)
    assert "| ResLoRA_is |" in (results / "fig3_smoke.md").read_text()


def test_a_style_redraws_the_digits_and_its_judges_tell_style_and_content_apart(tmp_path):
    from reslora.lab.tasks.text2image import mnist_digits, style_judges, stylise, target_style_score, to_pixels

    images, labels = mnist_digits()
    thick, outline = stylise(images[:50], "thick"), stylise(images[:50], "outline")
    assert thick.shape == outline.shape == (50, 28, 28) and thick.dtype == np.uint8
    assert (thick.astype(int) >= images[:50]).all() and thick.sum() > 1.5 * images[:50].sum()
    assert outline[images[:50] == 255].max() == 0 and outline.sum() > 0  # hollow: no ink inside full strokes
    with pytest.raises(ValueError, match="choose one of"):
        stylise(images[:1], "bold")
    content, judge, info = style_judges(tmp_path, "thick", JUDGE_EPOCHS)  # the task's judges: committed
    assert info["sha256"] == committed_hashes()[judges_name("thick", JUDGE_EPOCHS)] and not any(tmp_path.iterdir())
    assert info["content"]["held_out_accuracy"] > 0.95 and info["style_classifier"]["held_out_accuracy"] > 0.98
    assert min(info["content"]["held_out_accuracy_plain"], info["content"]["held_out_accuracy_styled"]) > 0.95
    prompts = torch.from_numpy(labels[-200:])
    plain, styled = to_pixels(images[-200:]), to_pixels(stylise(images[-200:], "thick"))
    assert target_style_score(styled, prompts, content, judge)["style_score"] > 0.85
    plain_score = target_style_score(plain, prompts, content, judge)
    assert plain_score["style_score"] < 0.1 and plain_score["content_score"] > 0.85
    items = plain_score["items"]  # each sample's verdicts, for paired intervals
    assert items["id"] == list(range(200)) and np.mean(items["content"]) == plain_score["content_score"]
    assert np.mean(items["correct"]) == plain_score["style_score"]


def test_samples_are_fixed_by_their_seed_and_eta_adds_step_noise():
    from reslora.lab.tasks.text2image import noise_scheduler, sample, small_unet

    torch.manual_seed(0)
    unet, scheduler = small_unet(cross_attention_dim=8).eval(), noise_scheduler()
    states, empty = torch.randn(2, 3, 8), torch.zeros(1, 3, 8)
    draw = lambda eta, seed=1: sample(unet, scheduler, states, empty, 3, 2.0, seed=seed, eta=eta)
    assert torch.equal(draw(1.0), draw(1.0)) and torch.equal(draw(0.0), draw(0.0))  # same seed, same samples
    assert not torch.allclose(draw(1.0), draw(0.0))  # ancestral steps add noise deterministic DDIM does not
    assert not torch.allclose(draw(1.0), draw(1.0, seed=2))
