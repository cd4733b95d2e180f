"""The ResLoRA linear layer: one module that computes lora / is / bs / ms (method.md, Eq. 1-4).

A layer knows its own math and reads what it needs of its chain from two places the model wires in:
``prev`` (its previous blocks, nearest first) and the per-forward state (``ForwardState``), which holds
what the earlier blocks of the chain computed in the current forward pass and nothing else.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class ForwardState:
    """What the blocks of one model saw in one forward pass: ``is`` keeps its input x_n, ``ms`` its
    ``A_n d(x_n)``. Created when the model's forward starts and dropped when it ends, so nothing survives
    between forwards or leaks between models. ``record`` says whether this pass adds to the merge
    statistics (training forwards and calibration, not evaluation or checkpoint recomputation); ``recorded``
    lists the (layer, window slot) pairs this pass wrote."""

    record: bool
    saved: dict = field(default_factory=dict)
    recorded: list = field(default_factory=list)


class ForwardSlot:
    """The one place a model's layers find the state of the forward pass in progress.

    ``begin``/``end`` are the forward pre-hook and (always-called) forward hook of the model's root
    module: the outermost call opens a fresh state and drops it when it ends, even on an exception."""

    def __init__(self):
        self.current: ForwardState | None = None
        self.depth = 0
        self.calibrating = False

    def begin(self, module: nn.Module, args) -> None:
        if self.depth == 0:
            self.current = ForwardState(record=module.training or self.calibrating)
        self.depth += 1

    def end(self, module: nn.Module, args, output) -> None:
        self.depth -= 1
        if self.depth == 0:
            state, self.current = self.current, None
            share_statistics(state.recorded)


def share_statistics(recorded: list) -> None:
    """Make one forward's records global in a distributed run (torch.distributed initialised, world size > 1).

    Under DDP every rank runs the same training forwards, each on its own shard of the batch. A record becomes
    sqrt(sum over ranks of its square): ||x||_F of the union of the shards, which is what one process that saw
    the whole batch records (for shards of equal sequence length). Every rank then holds the same windows and
    merges into the same W*, and DDP's broadcast of rank 0's buffers changes nothing. A collective: every rank
    must run the same training forwards and calibration batches, as it does under DDP."""
    if not recorded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    squares = torch.stack([torch.stack([layer.input_norms[slot], layer.ax_norms[slot]]).view(2)
                           for layer, slot in recorded]).square()
    dist.all_reduce(squares)
    for (layer, slot), (x_norm, ax_norm) in zip(recorded, squares.sqrt()):
        layer.input_norms.index_copy_(0, slot, x_norm.view(1))
        layer.ax_norms.index_copy_(0, slot, ax_norm.view(1))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored
    transposed, (in x out), PEFT's ``fan_in_fan_out``. A model holding one has imported transformers already, so
    the library never imports it (it needs torch and safetensors only)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


HALF_PRECISION = (torch.float16, torch.bfloat16)


def adapter_dtype(weight_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The dtype of lora_A / lora_B: float32 on a half-precision base unless the config keeps the base's dtype
    (PEFT's ``autocast_adapter_dtype``): half-precision adapters barely train (AdamW's updates round away in
    bf16, fp16 overflows to NaN)."""
    return torch.float32 if autocast_adapter_dtype and weight_dtype in HALF_PRECISION else weight_dtype


class ResLoraLinear(nn.Module):
    """Takes the place of a target ``nn.Linear`` (or transformers' ``Conv1D``): ``h_n = W_n x_n + s * (ResLoRA
    branch)``.

    The frozen ``base_layer`` is the original linear module; ``weight`` is its weight as stored (``(in x out)`` for
    a ``Conv1D``: ``fan_in_fan_out``), while ``lora_A`` (r x in, Kaiming-uniform as in LoRA)
    and ``lora_B`` (out x r, zeros) are the trainable tensors, so with B at its init the layer equals the
    base layer. The residual terms carry gradient: the shorter backward path through them is the point of the
    method (paper Sec. 3.4); only the research ablation ``detach_shortcut`` (ResLoraConfig) cuts it, leaving
    the forward values as they are.
    """

    def __init__(self, base_layer: nn.Linear, variant: str, r: int, lora_alpha: float, lora_dropout: float,
                 window: int, slot: ForwardSlot, detach_shortcut: bool = False, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.variant = variant
        self.r = r
        self.scaling = lora_alpha / r
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.window = window
        self.detach_shortcut = detach_shortcut
        if variant in ("is", "ms"):
            # Sliding windows of ||x_n||_F and, for ms, ||A_n d(x_n)||_F: kept on the device and written
            # without a host sync; read only when merging (method.md, "Input statistics").
            stats = dict(dtype=torch.float32, device=weight.device)
            self.register_buffer("input_norms", torch.zeros(window, **stats))
            self.register_buffer("ax_norms", torch.zeros(window, **stats))
            self.register_buffer("stat_count", torch.zeros((), dtype=torch.long, device=weight.device))
        self.prev: list[ResLoraLinear] = []
        self.chain = None
        self._slot = slot
        self.merged_in_place = False
        self.disabled = False  # ResLoraModel.disable_adapter(): the base layer alone

    @property
    def in_features(self) -> int:
        return self.base_layer.nx if self.fan_in_fan_out else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.nf if self.fan_in_fan_out else self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """s * B A: this block's own LoRA update, as a dense (out x in) matrix."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged_in_place or self.disabled:  # merged: base_layer holds W*; disabled: the base model alone
            return out
        # As PEFT: the branch runs in the adapter's dtype (float32 on a half-precision base) and its sum with
        # the base output is cast back to the base output's dtype. No-ops when the dtypes agree.
        dtype = self.lora_A.dtype
        if self.variant in ("lora", "bs"):
            A, B = self.lora_A, self.lora_B
            if self.variant == "bs" and self.prev:
                # Sum_k B_{n-k} A_{n-k} as one rank-(m+1)r product: one matmul pair, not m+1.
                A = torch.cat([A, *(self._shortcut(p.lora_A) for p in self.prev)], dim=0)
                B = torch.cat([B, *(self._shortcut(p.lora_B) for p in self.prev)], dim=1)
            return self._add_scaled(out, F.linear(self.lora_dropout(x.to(dtype)), A), B)

        state = self._forward_state()
        if self.variant == "is":
            state.saved[self] = x
            x_prev = self._saved_of_previous(state, x)
            x_n = x.to(dtype)
            # first block of a chain: x_{n-1} := x_n (its own input, not a shortcut)
            x_prev = x_n if x_prev is None else self._shortcut(x_prev).to(dtype)
            branch = F.linear(self.lora_dropout(x_n + x_prev), self.lora_A)
            self._record(state, x)
        else:  # ms
            ax = F.linear(self.lora_dropout(x.to(dtype)), self.lora_A)
            state.saved[self] = ax
            branch = ax
            if self._saved_of_previous(state, ax) is not None:
                for p in self.prev:
                    branch = branch + self._shortcut(state.saved[p])
            self._record(state, x, ax)
        return self._add_scaled(out, branch, self.lora_B)

    def _shortcut(self, residual: torch.Tensor) -> torch.Tensor:
        # detach() returns the same values, so the forward stays bit-identical; only the backward changes
        return residual.detach() if self.detach_shortcut else residual

    def _add_scaled(self, out: torch.Tensor, branch: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # out + B (s * branch): the scaling multiplies the rank-r intermediate, a pass over (tokens x r) instead
        # of over the full (tokens x out) output. Not torch.add(..., alpha=s): torch 2.13's CPU inductor drops
        # the alpha of an add fused with a matmul on 2-D inputs (torch.compile silently wrong).
        return (out + F.linear(branch * self.scaling, B)).to(out.dtype)

    def _forward_state(self) -> ForwardState:
        state = self._slot.current
        if state is None:
            raise RuntimeError(
                f"ResLoRA '{self.variant}' layer called outside a forward of its ResLoraModel: the residual "
                "path needs the model's per-forward state. Call the wrapped model (or its base model) rather "
                "than the layer; with activation checkpointing, enable it through "
                "ResLoraModel.gradient_checkpointing_enable or pass context_fn=model.checkpoint_context_fn.")
        return state

    def _saved_of_previous(self, state: ForwardState, mine: torch.Tensor) -> torch.Tensor | None:
        """The previous block's saved tensor in this forward, or None when this block starts a chain.

        Decision (method.md is silent): where the previous block's activation has another shape than this
        one's (a diffusion UNet changes resolution at equal width), the chain is split here for good."""
        if not self.prev:
            return None
        prev = self.prev[0]
        if prev not in state.saved:
            raise RuntimeError(
                f"ResLoRA block {self.chain.name_of(self)} needs the output of its previous block "
                f"{self.chain.name_of(prev)}, which did not run earlier in this forward; chains follow the "
                "order in which modules are registered, which must be the order in which they run.")
        theirs = state.saved[prev]
        if theirs.shape != mine.shape:
            self.chain.split_before(self, reason=f"activation shape {tuple(theirs.shape)} -> {tuple(mine.shape)}")
            return None
        return theirs

    def _record(self, state: ForwardState, x: torch.Tensor, ax: torch.Tensor | None = None) -> None:
        if not state.record:
            return
        slot = (self.stat_count % self.window).view(1)
        self.input_norms.index_copy_(0, slot, x.detach().float().norm().view(1))
        if ax is not None:
            self.ax_norms.index_copy_(0, slot, ax.detach().float().norm().view(1))
        self.stat_count += 1
        state.recorded.append((self, slot))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast every floating buffer; the merge statistics stay float32 (a
        # norm over a whole batch overflows fp16, bf16 keeps 3 digits) and only follow the model's device.
        norms = {name: self._buffers[name] for name in ("input_norms", "ax_norms") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in norms.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def mean_norms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(f_n, g_n): means of the recorded windows, or None before anything was recorded."""
        count = int(self.stat_count)
        if count == 0:
            return None
        filled = min(count, self.window)
        return self.input_norms[:filled].mean(), self.ax_norms[:filled].mean()

    def extra_repr(self) -> str:
        detached = ", detach_shortcut=True" if self.detach_shortcut else ""
        return f"variant={self.variant}, r={self.r}, scaling={self.scaling:g}, previous_blocks={len(self.prev)}{detached}"
