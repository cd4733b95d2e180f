"""ResLoraConfig: everything that defines a ResLoRA adapter (see ../shared/docs/method.md)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

VARIANTS = ("lora", "is", "bs", "ms")
CONFIG_NAME = "adapter_config.json"         # PEFT's name; it also holds the chains and the base model's id
LEGACY_CONFIG_NAME = "reslora_config.json"  # adapters saved before 2026-12 (with chains.json beside it)


@dataclass
class ResLoraConfig:
    """Hyper-parameters of a ResLoRA adapter.

    variant: ``lora`` (no residual), ``is`` (input-shortcut), ``bs`` (block-shortcut) or ``ms``
        (middle-shortcut).
    r, lora_alpha, lora_dropout: as in LoRA; the LoRA branch is scaled by ``lora_alpha / r``.
    target_modules: names matched as a whole dotted suffix of a module name (``"query"`` matches
        ``...attention.self.query``, as in PEFT), or one string taken as a regex matched against the whole
        module name, or ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` but the output layer
        (PEFT's rule). A chain joins the same target of consecutive blocks of one stack (method.md, "Chain").
    pre_num: how many previous blocks ``bs`` and ``ms`` use; -1 means all of them. ``is`` uses one.
    window: how many recent per-step input norms each block keeps for the merge statistics.
    autocast_adapter_dtype: keep the adapters (lora_A, lora_B) in float32 on a float16 / bfloat16 base, as PEFT
        does by default (the branch then runs in float32 and its result is cast to the base output's dtype);
        False keeps them in the base model's dtype. The merge statistics are float32 always.
    modules_to_save: modules (matched like ``target_modules``) kept fully trainable and saved with the
        adapter, e.g. a freshly initialised classification head.
    layer_order: module-name prefixes of the parts of one stream of blocks, in the order they run: their layers
        chain as one stack in that order. A diffusers UNet's down, mid and up blocks are one stream, which
        diffusers registers as down, up, mid: ``["down_blocks", "mid_block", "up_blocks"]``. Empty: every part
        (an encoder, a decoder, ``down_blocks``) chains apart, its blocks in registration order.
    detach_shortcut: a research ablation, off by default (never use it to train a real ResLoRA model). The
        forward pass is unchanged bit for bit, but no gradient flows through the residual terms: ``is``
        through x_{n-1} in layer n's branch, ``ms`` through A_{n-k} d(x_{n-k}) (k >= 1) in layer n's sum,
        ``bs`` through the previous blocks' B_{n-k} A_{n-k} in layer n's sum. Each block then learns only
        from its own layer's use of it, which separates the paper's gradient-path argument (its Sec. 3.4)
        from the forward rescaling that the residual terms also bring.
    """

    variant: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    pre_num: int = 1
    window: int = 100
    autocast_adapter_dtype: bool = True
    modules_to_save: list[str] = field(default_factory=list)
    layer_order: list[str] = field(default_factory=list)
    detach_shortcut: bool = False
    base_model_name_or_path: str | None = None  # the base model's hub id or path, saved with the adapter
    task_type: str | None = None  # PEFT's task type (SEQ_CLS, CAUSAL_LM, ...); None: inferred from the base class

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not supported; choose one of {list(VARIANTS)}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a number > 0 (the LoRA branch is scaled by "
                             "lora_alpha / r: 0 or less never learns or flips the update)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not isinstance(self.pre_num, int) or self.pre_num < -1:
            raise ValueError(f"pre_num={self.pre_num!r} must be -1 (all previous blocks) or an integer >= 0")
        if not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"window={self.window!r} must be a positive integer")
        for name in ("autocast_adapter_dtype", "detach_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules=[] matches nothing; give module names or a regex")
        elif not isinstance(self.target_modules, str):
            raise ValueError(f"target_modules={self.target_modules!r} must be a list of names or a regex string")
        self.modules_to_save = list(self.modules_to_save or [])
        self.layer_order = list(self.layer_order or [])
        if not all(isinstance(p, str) and p for p in self.layer_order):
            raise ValueError(f"layer_order={self.layer_order!r} must be a list of module-name prefixes")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, directory: str | Path) -> "ResLoraConfig":
        """The config saved in ``directory`` (adapter_config.json, or an older adapter's reslora_config.json)."""
        return cls.from_dict(read_adapter_config(directory))

    @classmethod
    def from_dict(cls, values: dict) -> "ResLoraConfig":
        """The config in a saved adapter's description (what else it holds, e.g. the chains, is left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def read_adapter_config(directory: str | Path) -> dict:
    """The JSON object of the adapter's config file, naming the file when it is missing or damaged."""
    path = Path(directory, CONFIG_NAME)
    if not path.is_file() and Path(directory, LEGACY_CONFIG_NAME).is_file():
        path = Path(directory, LEGACY_CONFIG_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{Path(directory, CONFIG_NAME)} does not exist: {directory} is not a saved ResLoRA "
                                "adapter")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the adapter's config is damaged") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not describe a ResLoRA adapter (not a JSON object)")
    if values.get("peft_type", "RESLORA") != "RESLORA":
        raise ValueError(f"{path} is a PEFT {values['peft_type']} adapter, not a ResLoRA one: load it with "
                         "peft.PeftModel.from_pretrained")
    return values
