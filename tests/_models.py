"""Tiny, deterministic, offline models and inputs for the ResLoRA tests.

Every ``build()`` seeds the RNG, so two calls give bases with identical weights ("fresh base" for loading,
PEFT comparisons, ...). Every ``inputs(seed)`` is deterministic too.
"""

from __future__ import annotations

import torch
from torch import nn

from reslora import ResLoraConfig, ResLoraModel, get_reslora_model

VARIANTS = ("lora", "is", "bs", "ms")


# ---- a toy stack of linears whose forward the tests can write down by hand ---------------------------------
class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class Toy(nn.Module):
    """``len(dims) - 1`` blocks ``x -> tanh(proj(x))``; the target layers are the ``proj``s."""

    def __init__(self, dims=(6, 6, 6, 6, 6)):
        super().__init__()
        self.dims = tuple(dims)
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


# ---- model specs -----------------------------------------------------------------------------------------
class Spec:
    name = ""
    targets: list[str] = []
    dtype = torch.float32

    def build(self) -> nn.Module:
        raise NotImplementedError

    def inputs(self, seed: int = 0) -> dict:
        raise NotImplementedError

    def output(self, model, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def config(self, variant: str, **kw) -> ResLoraConfig:
        kw.setdefault("r", 2)
        kw.setdefault("lora_alpha", 4.0)
        kw.setdefault("target_modules", list(self.targets))
        return ResLoraConfig(variant=variant, **kw)

    def wrap(self, variant: str, **kw) -> ResLoraModel:
        return get_reslora_model(self.build(), self.config(variant, **kw))


class ToySpec(Spec):
    name = "toy"
    targets = ["proj"]
    dtype = torch.float64

    def __init__(self, dims=(6, 6, 6, 6, 6)):
        self.dims = tuple(dims)

    def build(self):
        torch.manual_seed(0)
        return Toy(self.dims).to(torch.float64).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(100 + seed)
        return {"x": torch.randn(3, self.dims[0], generator=g, dtype=torch.float64)}

    def output(self, model, inputs):
        return model(inputs["x"])


class BertSpec(Spec):
    name = "bert"
    targets = ["query", "value"]

    def __init__(self, hidden_size: int = 16):
        self.hidden_size = hidden_size

    def build(self):
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=40, hidden_size=self.hidden_size, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(200 + seed)
        ids = torch.randint(0, 40, (2, 7), generator=g)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def output(self, model, inputs):
        return model(**inputs).logits


class LlamaSpec(Spec):
    name = "llama"

    def __init__(self, targets=("q_proj", "v_proj"), name="llama"):
        self.targets = list(targets)
        self.name = name

    def build(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=False, use_cache=False)
        return LlamaForCausalLM(config).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(300 + seed)
        return {"input_ids": torch.randint(0, 40, (2, 6), generator=g)}

    def output(self, model, inputs):
        return model(**inputs).logits


class UNetSpec(Spec):
    name = "unet"
    targets = ["to_q", "to_k", "to_v", "to_out.0"]

    def build(self):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
            norm_num_groups=4, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(400 + seed)
        return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 17]),
                "encoder_hidden_states": torch.randn(2, 5, 8, generator=g)}

    def output(self, model, inputs):
        return model(**inputs).sample


class TokensSpec(Spec):
    """A transformers model on token ids: ``build`` makes it from its config class with tiny sizes."""

    def __init__(self, name: str, model_class: str, config_class: str, targets, seq2seq: bool = False, **config):
        self.name, self.model_class, self.config_class = name, model_class, config_class
        self.targets, self.seq2seq, self.config_kwargs = targets, seq2seq, config

    def build(self):
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, self.config_class)(vocab_size=40, **self.config_kwargs)
        return getattr(transformers, self.model_class)(config).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(500 + seed)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        inputs = {"input_ids": torch.randint(3, 40, (2, 7), generator=g), "attention_mask": mask}
        if self.seq2seq:  # the decoder's length differs from the encoder's, as in real use
            inputs["decoder_input_ids"] = torch.randint(3, 40, (2, 4), generator=g)
        return inputs

    def output(self, model, inputs):
        return model(**inputs).logits

    def config(self, variant: str, **kw) -> ResLoraConfig:
        if isinstance(self.targets, str):  # "all-linear"
            kw.setdefault("target_modules", self.targets)
        return super().config(variant, **kw)


class ViTSpec(Spec):
    name = "vit"
    targets = ["q_proj", "v_proj"]

    def build(self):
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(600 + seed)
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}

    def output(self, model, inputs):
        return model(**inputs).logits


class MlpSpec(Spec):
    """An ``nn.Sequential`` of linears, targeted with ``"all-linear"``: the linears chain along their index where
    shapes allow (``2``, ``4``)."""

    name = "mlp"
    targets = "all-linear"

    def build(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 4)).eval()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(700 + seed)
        return {"x": torch.randn(3, 8, generator=g)}

    def output(self, model, inputs):
        return model(inputs["x"])

    def config(self, variant: str, **kw) -> ResLoraConfig:
        kw.setdefault("target_modules", self.targets)
        return super().config(variant, **kw)


TOY = ToySpec()
BERT = BertSpec()
LLAMA = LlamaSpec()
LLAMA_ALL = LlamaSpec(("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"), "llama_all")
UNET = UNetSpec()
# GPT-2's linears are transformers' Conv1D (weight stored transposed); "all-linear" leaves out its lm_head
GPT2 = TokensSpec("gpt2", "GPT2LMHeadModel", "GPT2Config", "all-linear", n_embd=16, n_layer=2, n_head=2,
                  n_positions=16, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
T5 = TokensSpec("t5", "T5ForConditionalGeneration", "T5Config", ["q", "v"], seq2seq=True, d_model=16, d_kv=8,
                d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0, decoder_start_token_id=0)
BART = TokensSpec("bart", "BartForConditionalGeneration", "BartConfig", ["q_proj", "v_proj"], seq2seq=True,
                  d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
DISTILBERT = TokensSpec("distilbert", "DistilBertForSequenceClassification", "DistilBertConfig", ["q_lin", "v_lin"],
                        dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, dropout=0.0,
                        attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3,
                        initializer_range=0.2)  # its default 0.02 leaves the adapters almost no effect on the logits
SPECS = {s.name: s for s in (TOY, BERT, LLAMA, LLAMA_ALL, UNET, GPT2, T5, BART, ViTSpec(), DISTILBERT, MlpSpec())}


# ---- helpers ---------------------------------------------------------------------------------------------
def randomize(model: ResLoraModel, seed: int = 0, b_scale: float = 0.3, a_scale: float | None = None) -> None:
    """Give every lora_B (and optionally lora_A) random non-zero values, deterministically by layer name."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, layer in sorted(model.named_reslora_layers().items()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * b_scale)
            if a_scale is not None:
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64) * a_scale)


def copy_adapter(src: ResLoraModel, dst: ResLoraModel) -> None:
    """Copy lora_A / lora_B by name from one wrapped model to another."""
    dst_layers = dst.named_reslora_layers()
    with torch.no_grad():
        for name, layer in src.named_reslora_layers().items():
            dst_layers[name].lora_A.copy_(layer.lora_A)
            dst_layers[name].lora_B.copy_(layer.lora_B)


def train_forwards(spec: Spec, model, n: int = 3, seed0: int = 0) -> None:
    """``n`` training-mode forwards on different inputs (they fill the merge statistics), back to eval."""
    model.train()
    with torch.no_grad():
        for i in range(n):
            spec.output(model, spec.inputs(seed0 + i))
    model.eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def role(name: str) -> str:
    """A target's role, written out independently of the library: its name (with a trailing index, to_out.0)
    and its parent module's name, numeric indices dropped."""
    parts = [p for p in name.split(".")]
    target = parts[-2:] if parts[-1].isdigit() else parts[-1:]
    parents = [p for p in parts[: len(parts) - len(target)] if not p.isdigit()]
    return ".".join(parents[-1:] + target)


def block_template(name: str) -> str:
    """A target's chain group, written out independently of the library: its name with every index replaced by
    ``*``, but for a trailing index that is not the only one (``to_out.0`` is a layer of its block)."""
    parts = name.split(".")
    indices = [i for i, p in enumerate(parts) if p.isdigit()]
    keep = indices[-1] if len(indices) > 1 and indices[-1] == len(parts) - 1 else None
    return ".".join("*" if p.isdigit() and i != keep else p for i, p in enumerate(parts))


def expected_chains(named_weights: list[tuple[str, tuple]], group) -> list[list[str]]:
    """Chains computed independently of the library: group names by ``group(name)`` in order, split where
    the weight shape changes."""
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, shape in named_weights:
        groups.setdefault(group(name), []).append((name, shape))
    chains = []
    for members in groups.values():
        current = [members[0]]
        for item in members[1:]:
            if item[1] != current[-1][1]:
                chains.append([n for n, _ in current])
                current = []
            current.append(item)
        chains.append([n for n, _ in current])
    return chains


def chains_of(model: ResLoraModel) -> list[list[str]]:
    return sorted([list(c.names) for c in model.chains])
