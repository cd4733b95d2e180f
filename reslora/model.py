"""Wrap any model with ResLoRA: find the target linears, build the cross-layer chains, scope the
per-forward state, save and load adapters, merge into a plain model (see merge.py)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import logging
import re
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, LEGACY_CONFIG_NAME, ResLoraConfig, read_adapter_config
from .io import atomic_path, write_json
from .layers import ForwardSlot, ForwardState, ResLoraLinear, is_conv1d
from .merge import INFERRED, SEQ_CLS_HEADS, check_not_merged, export_peft_adapter, fit_merge_ls, merged_weights

log = logging.getLogger("reslora")

WEIGHTS_NAME = "adapter_model.safetensors"
# What transformers.Trainer writes (checkpoints, save_model) for a model that is neither a PreTrainedModel nor a
# PeftModel: the wrapper's state dict, which holds the adapter and, as its extra state, the adapter's description.
# Trainer picks its layout by isinstance alone (Trainer._save), and this file is also the only one it reads back
# into such a model (_load_from_checkpoint, _load_best_model), so a Trainer checkpoint cannot be PEFT's layout.
TRAINER_WEIGHTS_NAME = "model.safetensors"
EXTRA_STATE = "_extra_state"
CHAINS_NAME = "chains.json"  # older adapters only: the chains are now in adapter_config.json
LS_SOLUTION = "ls_solution"  # the merge_ls fit of a block, saved with the adapter
ALL_LINEAR = "all-linear"  # target_modules shorthand, as in PEFT
# PEFT's task types by the class-name suffix of a transformers model
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


# Names PEFT and transformers users call on an adapted model that the base model would answer with its own
# machinery (transformers' adapters, the whole model's weights): the error says what to use here instead.
ONE_ADAPTER = ("a ResLoraModel holds exactly one adapter, always active: wrap a fresh base model with "
               "get_reslora_model (or ResLoraModel.from_pretrained) for another one")
PEFT_ALTERNATIVES = {
    **dict.fromkeys(("add_adapter", "set_adapter", "delete_adapter", "delete_adapters", "add_weighted_adapter",
                     "active_adapter", "active_adapters", "enable_peft_hotswap"), ONE_ADAPTER),
    "peft_config": "its config is model.reslora_config",
    "get_adapter_state_dict": "use model.adapter_state_dict()",
    "merge_adapter": "merge in place with `with model.merged(mode):` (restored on exit), or build a merged model "
                     "with model.merge_and_unload(mode)",
    "unmerge_adapter": "`with model.merged(mode):` restores the unmerged weights when its block ends",
    "enable_adapter_layers": "use model.enable_adapters()",
    "disable_adapter_layers": "use model.disable_adapters(), or the context `with model.disable_adapter():`",
    "get_nb_trainable_parameters": "use model.trainable_parameters()",
}


def task_type_of(base_model: nn.Module) -> str | None:
    name = type(base_model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def base_model_id(base_model: nn.Module) -> str | None:
    """The base model's hub id as transformers recorded it; None for a local path (it would not load elsewhere)."""
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None)
    return name if name and not Path(name).is_absolute() and not Path(name).exists() else None


def library_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("reslora")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def adapter_directory(name: str | Path) -> Path:
    """A local adapter directory as it is; anything else is taken as a hub repository id and downloaded
    (needs huggingface_hub and internet)."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FileNotFoundError(f"{name} is not a local directory, and huggingface_hub (to read it from the hub) is "
                                "not installed") from error
    try:
        return Path(snapshot_download(str(name), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, TRAINER_WEIGHTS_NAME]))
    except Exception as error:
        raise FileNotFoundError(f"{name} is neither a local adapter directory nor a hub repository that could be "
                                f"read ({type(error).__name__}: {error})") from error


def matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a list entry matches a whole dotted suffix of the name; a string is a full regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def target_name(module_name: str) -> str:
    """A layer's own name, what ``target_modules`` would call it: the last non-numeric component and what follows
    it (``...layer.3.attention.self.query`` -> ``query``, ``...attn1.to_out.0`` -> ``to_out.0``). Chains are grouped
    by ``chain_group``, not by this name (the encoder's and the decoder's ``q`` share it)."""
    parts = module_name.split(".")
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return ".".join(parts[i:])


def is_linear(module: nn.Module) -> bool:
    """A layer ResLoRA can adapt: ``nn.Linear`` or transformers' ``Conv1D`` (its weight stored transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def all_linear_targets(base_model: nn.Module, task_type: str | None) -> list[tuple[str, nn.Module]]:
    """PEFT's ``target_modules="all-linear"``, as (name, module): every linear layer but the output layer, which is
    the output embeddings of a transformers model, or the head (``score``, ``classifier``) of a sequence classifier."""
    output = getattr(base_model, "get_output_embeddings", lambda: None)()
    if output is None and task_type == "SEQ_CLS":
        output = next((getattr(base_model, name) for name in SEQ_CLS_HEADS if hasattr(base_model, name)), None)
    return [(n, m) for n, m in base_model.named_modules() if n and is_linear(m) and m is not output]


def chain_group(module_name: str, layer_order: list[str]) -> str:
    """The group a target layer chains in (method.md, "Chain"): its name with the indices of repeated blocks
    wildcarded, so the same layer of consecutive blocks of one stack shares a group and the encoder's and the
    decoder's do not (``encoder.block.*.layer.*.SelfAttention.q``, ``decoder.block.*...``).

    A trailing index is part of the layer's own name (``attn1.to_out.0``), unless it is the name's only index: the
    linears of an ``nn.Sequential`` or ``nn.ModuleList`` outside any repeated block (``mlp.0``, ``mlp.2``) chain
    along it. The parts of one stream that ``layer_order`` names (a UNet's down, mid and up blocks) are one
    stack: the prefix and the index after it are dropped."""
    parts = module_name.split(".")
    for prefix in layer_order:
        head = prefix.split(".")
        if parts[:len(head)] == head:
            rest = parts[len(head):]
            parts = ["<layer_order>", *(rest[1:] if rest and rest[0].isdigit() else rest)]
            break
    indices = [i for i, p in enumerate(parts) if p.isdigit()]
    own = len(parts) - 1 if len(indices) > 1 and indices[-1] == len(parts) - 1 else None
    return ".".join("*" if p.isdigit() and i != own else p for i, p in enumerate(parts))


def stack_root(module_name: str) -> str:
    """The module holding the container of a layer's repeated blocks (``encoder`` for ``encoder.block.3...``,
    ``model`` for ``model.layers.3...``; the root, "", when the container is the model's own child)."""
    parts = module_name.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
    return ".".join(parts[:max(first - 1, 0)])


def role_name(module_name: str) -> str:
    """A target layer's role, the label reports give a chain (method.md, "Chain"): the target name together with
    the name of its parent module, numeric indices dropped (``...layer.3.attention.self.query`` -> ``self.query``;
    in a diffusers UNet ``...attn1.to_k`` (self-attention) and ``...attn2.to_k`` (cross-attention) differ)."""
    parts = module_name.split(".")
    target = target_name(module_name)
    parents = [p for p in parts[: len(parts) - len(target.split("."))] if not p.isdigit()]
    return ".".join(parents[-1:] + [target])


class Chain:
    """The target layers of one group (``chain_group``) and one (in, out) shape, in the order the blocks run.

    ``wire`` gives each layer its previous blocks (nearest first): none for ``lora``, one for ``is``,
    ``pre_num`` (or all, for -1) for ``bs`` and ``ms``; near the start of a chain only those that exist."""

    def __init__(self, names: list[str], layers: list[ResLoraLinear], depth: int, chains: list["Chain"]):
        self.names, self.layers, self.depth, self._chains = names, layers, depth, chains
        chains.append(self)
        self.wire()

    def wire(self) -> None:
        for i, layer in enumerate(self.layers):
            k = i if self.depth < 0 else min(self.depth, i)
            layer.chain = self
            layer.prev = self.layers[i - k:i][::-1]

    def position(self, layer: ResLoraLinear) -> int:
        return next(i for i, other in enumerate(self.layers) if other is layer)

    def name_of(self, layer: ResLoraLinear) -> str:
        return self.names[self.position(layer)]

    def split_before(self, layer: ResLoraLinear, reason: str) -> None:
        i = self.position(layer)
        log.info("ResLoRA chain split before %s (%s)", self.names[i], reason)
        tail_names, tail_layers = self.names[i:], self.layers[i:]
        self.names, self.layers = self.names[:i], self.layers[:i]
        self.wire()
        Chain(tail_names, tail_layers, self.depth, self._chains)
        if all(len(chain.layers) == 1 for chain in self._chains):
            warnings.warn(f"ResLoRA: after the split before {tail_names[0]} ({reason}) no chain is longer than one "
                          "block: every layer now trains as plain LoRA", stacklevel=2)


def _chain_depth(config: ResLoraConfig) -> int:
    return {"lora": 0, "is": 1}.get(config.variant, config.pre_num)


class ResLoraModel(nn.Module):
    """A base model with ResLoRA adapters: same forward signature and outputs as the base model.

    The base model is modified in place as in PEFT (targets replaced by ``ResLoraLinear``, everything else
    frozen except ``modules_to_save``); attributes the wrapper lacks (``config``, ``generate``, ...) are
    looked up on the base model.
    """

    def __init__(self, base_model: nn.Module, config: ResLoraConfig):
        super().__init__()
        self.base_model = base_model
        # what the adapter files record about the base model: given, or read off it
        self.reslora_config = dataclasses.replace(
            config, task_type=config.task_type or task_type_of(base_model),
            base_model_name_or_path=config.base_model_name_or_path or base_model_id(base_model))
        self._slot = ForwardSlot()
        self._hooks = []
        self._requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        try:  # all or nothing: a wrap that fails leaves the base model as it was
            base_model.requires_grad_(False)
            self._inject(config)
            self._unfreeze_modules_to_save(config.modules_to_save)
            self.chains = self._build_chains(config)
            # before any split found at run time: what the chains of an adapter loaded here must be pieces of
            self._built_chains = [list(chain.names) for chain in self.chains]
        except BaseException:
            self.unload()
            raise
        # The forward state is scoped by hooks on the base model's root and on the root of each stack (an encoder,
        # a decoder, a backbone), so that every way of running it (our forward, generate calling the encoder
        # alone, a direct call of the backbone) gets a fresh state that is dropped when the outermost call ends.
        roots = {""} | {stack_root(name) for name in self.named_reslora_layers()}
        for root in sorted(roots):
            module = base_model.get_submodule(root)
            self._hooks += [module.register_forward_pre_hook(self._slot.begin),
                            module.register_forward_hook(self._slot.end, always_call=True)]
        # The wrapper's state is the adapter's (what training changes), so that a checkpoint of it (a Trainer
        # checkpoint, torch.save(model.state_dict())) holds the adapter and not a copy of the frozen base model;
        # model.base_model.state_dict() has everything.
        self.register_state_dict_post_hook(_keep_adapter_state)
        self.register_load_state_dict_post_hook(_frozen_weights_are_not_missing)

    def unload(self) -> nn.Module:
        """The base model as it was before wrapping (adapters dropped, not merged): its own linear layers back,
        no hooks, every parameter's ``requires_grad`` as before."""
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, ResLoraLinear):
                parent_name, _, child = name.rpartition(".")
                setattr(self.base_model.get_submodule(parent_name), child, module.base_layer)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        return self.base_model

    # ---- construction -------------------------------------------------------------------------------
    def _inject(self, config: ResLoraConfig) -> None:
        if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
            targets = all_linear_targets(self.base_model, self.reslora_config.task_type)
        else:
            targets = [(n, m) for n, m in self.base_model.named_modules() if n and matches(n, config.target_modules)]
        if not targets:
            linears = sorted({target_name(n) for n, m in self.base_model.named_modules() if n and is_linear(m)})
            raise ValueError(f"target_modules={config.target_modules!r} matched no module; the linear layers "
                             f"of this model are named {linears}")
        for name, module in targets:  # check them all before changing anything
            if not is_linear(module):
                raise TypeError(f"target module {name!r} is a {type(module).__name__}; ResLoRA adapts nn.Linear and "
                                "transformers' Conv1D only")
            if module.weight.is_meta:
                raise ValueError(f"target module {name!r} has its weight on the meta device (no data): load the base "
                                 "model's weights first (e.g. from_pretrained without device_map='meta', or "
                                 "to_empty() then load_state_dict), then wrap it")
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            layer = ResLoraLinear(module, config.variant, config.r, config.lora_alpha, config.lora_dropout,
                                  config.window, self._slot, detach_shortcut=config.detach_shortcut,
                                  autocast_adapter_dtype=config.autocast_adapter_dtype)
            setattr(self.base_model.get_submodule(parent_name), child, layer)

    def _unfreeze_modules_to_save(self, patterns: list[str]) -> None:
        if not patterns:
            return
        chosen = [m for n, m in self.base_model.named_modules() if n and matches(n, patterns)]
        if not chosen:
            raise ValueError(f"modules_to_save={patterns!r} matched no module of {type(self.base_model).__name__}")
        for module in chosen:
            module.requires_grad_(True)

    def _build_chains(self, config: ResLoraConfig) -> list[Chain]:
        def run_order(item):  # stable: layers matching no prefix of layer_order keep their place at the end
            return next((i for i, p in enumerate(config.layer_order) if item[0] == p or item[0].startswith(p + ".")),
                        len(config.layer_order))

        def shape(layer):
            return layer.in_features, layer.out_features

        groups: dict[str, list[tuple[str, ResLoraLinear]]] = {}
        for name, layer in sorted(self.named_reslora_layers().items(), key=run_order):
            groups.setdefault(chain_group(name, config.layer_order), []).append((name, layer))
        chains: list[Chain] = []
        for members in groups.values():
            start = 0
            for i in range(1, len(members) + 1):
                if i == len(members) or shape(members[i][1]) != shape(members[i - 1][1]):
                    if i < len(members):
                        log.info("ResLoRA chain split before %s: (in, out) %s -> %s", members[i][0],
                                 shape(members[i - 1][1]), shape(members[i][1]))
                    names, layers = zip(*members[start:i])
                    Chain(list(names), list(layers), _chain_depth(config), chains)
                    start = i
        if config.variant != "lora" and all(len(chain.layers) == 1 for chain in chains):
            raise ValueError(
                f"variant={config.variant!r} found no chain longer than one block among its {len(chains)} target "
                f"layers (first {chains[0].names[0]!r}), so it would train plain LoRA under another name. A chain "
                "joins the same layer of consecutive blocks of one stack (equal names but for the block index, equal "
                "(in, out) shapes; the linears of an nn.Sequential along their index). Target layers that repeat "
                "across blocks, name the parts of one stream in layer_order, or use variant='lora'")
        return chains

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in PEFT_ALTERNATIVES:
                raise AttributeError(f"{type(self).__name__} has no {name!r} (the base model's would act on the "
                                     f"base model, not on the ResLoRA adapter): {PEFT_ALTERNATIVES[name]}") from None
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value) -> None:
        # TRL's SFTTrainer gives the model it trains a fused LM head (trl.trainer.utils.add_fused_lm_head): a forward
        # bound to the model that, called with fused_lm_head=True, runs `self.base_model` as transformers' backbone
        # and multiplies by `self.get_output_embeddings().weight`. A PeftModel gets it on its transformers model; on
        # this wrapper `base_model` is the whole transformers model, so the head runs with that model as its `self`
        # (its base_model is the backbone). It stays the wrapper's forward: unfused, it calls the wrapper's own one.
        # A partial, not a bound method: accelerate's autocast keeps a forward without __func__ as it is.
        if (name == "forward" and getattr(value, "__self__", None) is self
                and "fused_lm_head" in (getattr(getattr(value, "__func__", None), "__kwdefaults__", None) or {})):
            if isinstance(self.get_output_embeddings(), ResLoraLinear):
                raise ValueError("a ResLoRA adapter on the LM head is not supported by TRL's fused LM head "
                                 "(SFTTrainer): it multiplies by lm_head.weight directly, so the adapter would never "
                                 "train; remove the LM head from target_modules")
            value = functools.partial(value.__func__, self.base_model)
        super().__setattr__(name, value)

    def checkpoint_context_fn(self):
        """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recomputation of a checkpointed
        block sees the state of the forward pass it belongs to, and records no statistics twice."""
        captured = self._slot.current

        @contextmanager
        def recompute():
            slot = self._slot
            outer = slot.current, slot.depth
            slot.current = None if captured is None else ForwardState(record=False, saved=captured.saved)
            slot.depth += 1
            try:
                yield
            finally:
                slot.current, slot.depth = outer

        return nullcontext(), recompute()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Activation checkpointing of a transformers model, with the residual paths kept intact (what
        ``transformers.Trainer`` calls for ``TrainingArguments(gradient_checkpointing=True)``)."""
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant", False):
            raise ValueError("use_reentrant=True is not supported: reentrant checkpointing drops the gradient of "
                             "the residual inputs that a block reads from earlier blocks; use use_reentrant=False")
        options.update(use_reentrant=False, context_fn=self.checkpoint_context_fn)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """The older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Fill the merge statistics from forwards on ``batches`` (dicts of keyword arguments or tensors),
        e.g. for a model trained elsewhere. Use training data, never the evaluation set."""
        check_not_merged(self, "calibrate")
        self._slot.calibrating = True
        try:
            for batch in batches:
                self(**batch) if isinstance(batch, dict) else self(batch)
        finally:
            self._slot.calibrating = False

    def fit_merge_ls(self, batches, ridge: float = 1e-4) -> None:
        """Fit the least-squares merge (``merge_ls``) on calibration batches of training data."""
        fit_merge_ls(self, batches, ridge)

    # ---- inspection ---------------------------------------------------------------------------------
    def named_reslora_layers(self) -> dict[str, ResLoraLinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, ResLoraLinear)}

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- switching the adapter off (PEFT's and transformers' names) ------------------------------------
    def get_base_model(self) -> nn.Module:
        """The base model, with the ResLoRA layers in it (PEFT's name)."""
        return self.base_model

    def disable_adapters(self) -> None:
        """Switch the adapter off until ``enable_adapters()``: the model computes the base model's outputs and
        records no merge statistics."""
        check_not_merged(self, "disable the adapter")
        for layer in self.named_reslora_layers().values():
            layer.disabled = True

    def enable_adapters(self) -> None:
        """Switch the adapter back on after ``disable_adapters()``."""
        for layer in self.named_reslora_layers().values():
            layer.disabled = False

    @contextmanager
    def disable_adapter(self):
        """PEFT's context: inside the block the model computes the base model's outputs; on exit, also on an
        exception, the adapter is as it was before.

            with model.disable_adapter():
                reference = model(**batch)
        """
        before = {layer: layer.disabled for layer in self.named_reslora_layers().values()}
        self.disable_adapters()
        try:
            yield self
        finally:
            for layer, disabled in before.items():
                layer.disabled = disabled

    # ---- merging ------------------------------------------------------------------------------------
    @contextmanager
    def merged(self, mode: str = "merge_bi"):
        """Evaluate merged, in place: inside the block this model computes exactly what
        ``merge_and_unload(mode)`` computes (the same W*, the same linear layers), using extra memory of the
        merged target weights only; on exit, also on an exception, every target weight is restored bit for bit
        (the original tensors are put back). Adapters, gradients and merge statistics are not touched.

            with model.merged("merge_bi"):
                metrics = evaluate(model)
        """
        if any(layer.disabled for layer in self.named_reslora_layers().values()):
            raise RuntimeError("cannot merge in place while the adapter is disabled (disable_adapters() or inside "
                               "`with model.disable_adapter():`): enable it first, or evaluate the base model as it is")
        weights = merged_weights(self, mode)
        originals = {layer: layer.base_layer.weight.data for layer in weights}
        try:
            for layer, weight in weights.items():
                layer.base_layer.weight.data = weight
                layer.merged_in_place = True
            yield self
        finally:
            for layer, original in originals.items():
                layer.base_layer.weight.data = original
                layer.merged_in_place = False

    def merge_and_unload(self, mode: str = "merge_bi") -> nn.Module:
        """A new model of the base model's own classes with every target weight replaced by its merged W*
        (``plain``, ``merge_bi``, ``merge_bw``; see merge.py). This model is left untouched."""
        replacements = {}
        for layer, weight in merged_weights(self, mode).items():
            linear = copy.deepcopy(layer.base_layer)
            linear.weight.data.copy_(weight)
            replacements[id(layer)] = linear
        for module in self.base_model.modules():
            # Activation checkpointing enabled through this wrapper binds checkpoint_context_fn (hence this
            # whole model) into the base model; the merged model checkpoints as usual, without it.
            func = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(func, functools.partial) and getattr(func.keywords.get("context_fn"), "__self__", None) is self:
                keywords = {k: v for k, v in func.keywords.items() if k != "context_fn"}
                replacements[id(func)] = functools.partial(func.func, *func.args, **keywords)
        plain = copy.deepcopy(self.base_model, memo=replacements)
        for module in plain.modules():
            for handle in self._hooks:
                for hooks in (module._forward_pre_hooks, module._forward_hooks, module._forward_hooks_always_called):
                    hooks.pop(handle.id, None)
            # A forward set on the instance by a tool (TRL's fused LM head, accelerate's autocast) would be copied
            # still calling the trained model's original forward through its closure: the merged model runs its own.
            vars(module).pop("forward", None)
        return plain

    def export_peft_adapter(self, directory: str | Path, mode: str = "merge_bi", task_type: str | None = INFERRED):
        """Write the merged model as an ordinary HF PEFT LoRA adapter (``PeftModel.from_pretrained``). ``task_type``
        overrides PEFT's task type (the adapter's by default; None: none), e.g. for a model whose PEFT class
        differs from the one its class name suggests."""
        export_peft_adapter(self, directory, mode, task_type)

    # ---- save / load --------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors (lora_A, lora_B, modules_to_save) and the merge statistics, keyed by their
        names in the base model."""
        return {k: v.contiguous().cpu() for k, v in trainable_state(self.base_model).items()}

    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        """Save the adapter (not the base model): the name transformers and PEFT users call. ``kwargs`` that
        ``PreTrainedModel.save_pretrained`` takes are accepted and ignored."""
        self.save_adapter(directory)

    def save_adapter(self, directory: str | Path) -> None:
        """``adapter_config.json`` (the config, the chains, the base model's id, the task type, the library and its
        version) and ``adapter_model.safetensors`` (trained tensors, merge statistics and any merge_ls fit)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.adapter_state_dict()
        for name, layer in self.named_reslora_layers().items():
            if getattr(layer, "ls_solution", None) is not None:
                tensors[f"{name}.{LS_SOLUTION}"] = torch.as_tensor(layer.ls_solution).detach().contiguous().cpu()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp))
        write_json(directory / CONFIG_NAME, self.adapter_description())

    def adapter_description(self) -> dict:
        """What ``adapter_config.json`` holds: the config, the chains, the base model's id, the task type, the
        library and its version."""
        return {"peft_type": "RESLORA", "library": "reslora", "library_version": library_version(),
                **self.reslora_config.to_dict(), "chains": [chain.names for chain in self.chains]}

    def get_extra_state(self) -> torch.Tensor:
        """The adapter's description (``adapter_description()`` as JSON bytes) in this model's state dict, so that
        a checkpoint of the state alone is a complete adapter: ``transformers.Trainer`` saves a model that is not a
        ``PreTrainedModel`` or ``PeftModel`` as its ``state_dict()`` in ``model.safetensors`` (checkpoints and
        ``save_model``), and ``from_pretrained`` loads that directory."""
        return torch.frombuffer(bytearray(json.dumps(self.adapter_description()).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Loading a state dict (``resume_from_checkpoint``): refuse the state of an adapter with another config;
        restore the chain splits it had."""
        saved = _decode_description(state)
        mine, theirs = self.reslora_config.to_dict(), ResLoraConfig.from_dict(saved).to_dict()
        differ = [f"{k}: {theirs[k]!r} saved, {mine[k]!r} here" for k in mine
                  if k != "base_model_name_or_path" and mine[k] != theirs[k]]
        if differ:
            raise ValueError(f"the state being loaded belongs to a ResLoRA adapter with another config "
                             f"({'; '.join(differ)})")
        self._restore_chain_splits(saved["chains"])

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload ResLoRA adapter", private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Upload the adapter (what ``save_pretrained`` writes, not the base model) to the hub repository
        ``repo_id``, created if needed; ``ResLoraModel.from_pretrained(base, repo_id)`` loads it back. Needs
        huggingface_hub."""
        try:
            from huggingface_hub import HfApi
        except ImportError as error:
            raise ImportError("push_to_hub needs huggingface_hub (pip install huggingface_hub)") from error
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as directory:
            self.save_adapter(directory)
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=directory, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path) -> "ResLoraModel":
        """Wrap ``base_model`` with the adapter saved in ``directory`` (a local directory, or a hub repository id):
        ``save_pretrained``'s output, or a ``transformers.Trainer`` checkpoint or ``save_model`` output of a
        ResLoraModel. All or nothing: when the adapter cannot be loaded, the base model is left exactly as it was."""
        directory = adapter_directory(directory)
        description, saved = read_adapter(directory)
        model = wrapper_class(type(base_model))(base_model, ResLoraConfig.from_dict(description))
        try:
            model._load_tensors(saved, description["chains"], directory)
        except BaseException:
            model.unload()
            raise
        return model

    def load_adapter(self, directory: str | Path) -> None:
        """Load the tensors of an adapter saved in ``directory`` (any layout ``from_pretrained`` reads)."""
        description, saved = read_adapter(directory)
        self._load_tensors(saved, description["chains"], directory)

    def _load_tensors(self, saved: dict[str, torch.Tensor], saved_chains: list[list[str]], directory) -> None:
        layers = self.named_reslora_layers()
        fits = {name.removesuffix("." + LS_SOLUTION): saved.pop(name) for name in list(saved)
                if name.endswith("." + LS_SOLUTION) and name.removesuffix("." + LS_SOLUTION) in layers}
        expected = self.adapter_state_dict()
        for name, tensor in saved.items():
            if name not in expected:
                raise ValueError(f"adapter tensor {name!r} has no place in {type(self.base_model).__name__}; "
                                 f"is {directory} an adapter for another model?")
            if tensor.shape != expected[name].shape:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)} but the base model "
                                 f"needs {tuple(expected[name].shape)}: the adapter was made for another model")
        missing = sorted(set(expected) - set(saved))
        if missing:
            raise ValueError(f"adapter in {directory} lacks {len(missing)} tensors, first {missing[0]!r}")
        self.base_model.load_state_dict(saved, strict=False)
        for name, solution in fits.items():
            layers[name].ls_solution = solution.to(layers[name].weight.device)
        self._restore_chain_splits(saved_chains)

    def _restore_chain_splits(self, saved_chains: list[list[str]]) -> None:
        """Split the chains where the saved adapter's were split at run time. Refused when a saved chain is not a
        piece of a chain built here (an older adapter whose chains join an encoder to its decoder, which chain apart
        now): the adapter would run as another model than the one trained."""
        built = {name: names for names in self._built_chains for name in names}
        for names in saved_chains:
            chain = built.get(names[0], [])
            start = chain.index(names[0]) if chain else 0
            if chain[start:start + len(names)] != names:
                raise ValueError(f"the saved adapter's chain {names} is not a piece of the chain built here for "
                                 f"{names[0]!r} ({chain or 'none: no such target layer'}): the adapter was trained "
                                 "with other chains (an older version's chain rule, which could join an encoder to "
                                 "its decoder), so it would run as another model than the one trained")
        heads = {names[0] for names in saved_chains}
        for chain in list(self.chains):
            for name, layer in list(zip(chain.names, chain.layers))[1:]:
                if name in heads:
                    layer.chain.split_before(layer, reason="as in the saved adapter")


def _safetensors(path: Path, directory) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a saved ResLoRA adapter") from None
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} cannot be read as safetensors ({error}): the file is damaged or truncated; "
                         "save the adapter again") from error


def _decode_description(state: torch.Tensor) -> dict:
    return json.loads(bytes(state.cpu().tolist()).decode())


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors keyed by base-model names) of the adapter in ``directory``: ``save_pretrained``'s
    layout (adapter_config.json, adapter_model.safetensors), or a ``transformers.Trainer`` checkpoint of a
    ResLoraModel (model.safetensors: the wrapper's state dict, description included as its extra state)."""
    directory = Path(directory)
    trainer_weights = directory / TRAINER_WEIGHTS_NAME
    has_config = any((directory / name).is_file() for name in (CONFIG_NAME, LEGACY_CONFIG_NAME))
    if not has_config and trainer_weights.is_file():
        state = _safetensors(trainer_weights, directory)
        if EXTRA_STATE not in state:
            raise ValueError(f"{trainer_weights} holds no ResLoRA adapter description: it is not the state of a "
                             "ResLoraModel (a transformers.Trainer checkpoint or save_model output of one)")
        description = _decode_description(state.pop(EXTRA_STATE))
        return description, {k.removeprefix("base_model."): v for k, v in state.items()}
    description = read_adapter_config(directory)
    saved = _safetensors(directory / WEIGHTS_NAME, directory)
    if description.get("chains") is None:  # an older adapter: chains.json beside reslora_config.json
        chains_path = directory / CHAINS_NAME
        try:
            description["chains"] = json.loads(chains_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{chains_path} cannot be read ({error}): the adapter is incomplete or damaged") from error
    return description, saved


STATISTICS = (".input_norms", ".ax_norms", ".stat_count")  # the buffers of a ResLoRA layer (merge statistics)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, detached copies keyed as in ``module.state_dict()``: the trainable parameters and
    the ResLoRA merge statistics. Works for any module (a ResLoraModel, its base model, a PEFT model)."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in module.state_dict().items() if n in trainable or n.endswith(STATISTICS)}


def _frozen_names(module: ResLoraModel) -> set[str]:
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return frozen | {n for n, _ in module.named_buffers(remove_duplicate=False) if not n.endswith(STATISTICS)}


def _keep_adapter_state(module: ResLoraModel, state: dict, prefix: str, local_metadata) -> None:
    for name in _frozen_names(module):
        state.pop(prefix + name, None)


def _frozen_weights_are_not_missing(module: ResLoraModel, incompatible) -> None:
    """Loading the adapter's state alone (strict or not) reports no frozen base weight as missing."""
    frozen = _frozen_names(module)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not any(k.split(".", i)[-1] in frozen for i in range(k.count(".") + 1))]


def get_reslora_model(base_model: nn.Module, config: ResLoraConfig) -> ResLoraModel:
    """Wrap ``base_model`` (modified in place, as PEFT does) with ResLoRA adapters described by ``config``."""
    return wrapper_class(type(base_model))(base_model, config)


@functools.lru_cache(maxsize=None)
def wrapper_class(base_class: type) -> type:
    """``ResLoraModel`` whose ``forward`` carries the signature of ``base_class.forward``: tools that read the
    signature see the base model's arguments (``transformers.Trainer`` keeps the dataset columns the model takes
    and finds its label names, as for the base model itself)."""
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    forward.__signature__ = inspect.signature(base_class.forward)
    forward.__doc__ = base_class.forward.__doc__
    return type(f"ResLora{base_class.__name__}", (ResLoraModel,), {"forward": forward, "__module__": __name__,
                                                                   "__qualname__": f"ResLora{base_class.__name__}"})
