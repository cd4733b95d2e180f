"""Merging the residual paths away (method.md, "Inference").

``merged_weights`` computes W*_n for every block in one of the modes below; the model turns them into a
new plain model (``ResLoraModel.merge_and_unload``) or into an ordinary PEFT LoRA adapter
(``export_peft_adapter``). Nothing here modifies the trained model.

| mode       | W*_n                                                                                     |
|------------|------------------------------------------------------------------------------------------|
| plain      | W_n + s B_n A_n  (drop the residual paths: the paper's "w/o merge")                      |
| merge_bi   | from input statistics (paper Eq. 8-9, 12)                                                |
| merge_bw   | from weights (paper Eq. 10-11, 13)                                                       |
| merge_ls   | ours: least squares on calibration activations (``fit_merge_ls``), instead of norm ratios |

``bs`` merges exactly in both merge modes: W_n + s sum_{k=0..m} B_{n-k} A_{n-k}. ``is`` and ``ms`` assume
x_{n-k} ~ alpha x_n and estimate alpha:
  is  merge_bi: alpha = f_{n-1} / f_n (1 for a chain's first block)
  is  merge_bw: alpha = f*_{n-2} / f*_{n-1}, f*_j = ||W_j + s B_j A_j||_F (1 with fewer than 2 predecessors)
  ms  merge_bi: alpha = sum_{k=1..m} g_{n-k} / g_n
  is, ms (merge_bi): W*_n = W_n + (1 + alpha) s B_n A_n
  ms  merge_bw: A*_n = A_n + sum_{k=1..m} (f_{n-k} / f_n) A_{n-k};  W*_n = W_n + s B_n A*_n
where f_n, g_n are the means of the windows of ||x_n||_F and ||A_n d(x_n)||_F.

merge_ls fits the merged block to what the residual branch computes on calibration inputs (training data,
dropout off), over all tokens of all calibration batches:
  is: alpha = argmin ||B A (x_n + x_{n-1}) - (1 + alpha) B A x_n||^2 = <u, v> / <u, u>, u = B A x_n, v = B A x_{n-1}
  ms: A* = argmin ||sum_{k=0..m} A_{n-k} x_{n-k} - A* x_n||^2, a ridge-stabilised linear regression
  bs: exact, as above.

Decision: the names follow the paper's formulas. The authors' README maps merge_flag 3 -> merge_bi and
4 -> merge_bw, but their code computes the reverse; here the names mean what the formulas say.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .io import atomic_path
from .layers import ResLoraLinear

MERGE_MODES = ("plain", "merge_bi", "merge_bw", "merge_ls")
INFERRED = "inferred"  # export_peft_adapter's default task type: the adapter's own (given, or read off the base class)
# A sequence classifier's head as PEFT names it for SEQ_CLS: "all-linear" leaves it out, an exported adapter keeps it
SEQ_CLS_HEADS = ("score", "classifier")


def _check_mode(mode: str) -> None:
    if mode == "unmerged":
        raise ValueError("mode='unmerged' is the ResLoraModel itself: evaluate the model, do not merge it")
    if mode not in MERGE_MODES:
        raise ValueError(f"mode={mode!r} is not a merge mode; choose one of {list(MERGE_MODES)}")


def check_not_merged(model, action: str) -> None:
    """Refuse ``action`` inside ``with model.merged(...)``: the target weights then hold W*, so a second merge
    would add the update on top of it."""
    if any(layer.merged_in_place for layer in model.named_reslora_layers().values()):
        raise RuntimeError(f"cannot {action} inside `with model.merged(...)`: the target weights hold the merged W* "
                           "until the block ends (merging again would add the update twice). Leave the block first; "
                           "it restores the unmerged weights on exit")


def _norms(layer: ResLoraLinear, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    norms = layer.mean_norms()
    if norms is None:
        name = layer.chain.name_of(layer)
        raise RuntimeError(
            f"{mode} of a ResLoRA '{layer.variant}' model needs the input statistics of block {name}, which has "
            "seen no training forward yet: only forwards in train mode record them (call model.train() before "
            "training: from_pretrained and many trainers' evaluation leave the model in eval mode), or fill them "
            "from training batches with model.calibrate(batches)")
    return norms


def low_rank_factors(layer: ResLoraLinear, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*, A*) with W*_n = W_n + s B* A*: the merged update of one block as a low-rank product."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if mode == "plain" or layer.variant == "lora":
        return B, A
    if layer.variant == "bs":
        blocks = [layer, *layer.prev]
        return (torch.cat([b.lora_B.detach() for b in blocks], dim=1),
                torch.cat([b.lora_A.detach() for b in blocks], dim=0))
    if mode == "merge_ls":
        solution = getattr(layer, "ls_solution", None)
        if solution is None:
            raise RuntimeError(f"merge_ls needs a least-squares fit: call model.fit_merge_ls(train_batches) first "
                               f"(block {layer.chain.name_of(layer)} has none)")
        return ((1 + solution) * B, A) if layer.variant == "is" else (B, solution.to(A.dtype))
    if layer.variant == "ms" and mode == "merge_bw":
        f_n = _norms(layer, mode)[0]
        return B, A + sum((_norms(p, mode)[0] / f_n) * p.lora_A.detach() for p in layer.prev)
    return (1 + _alpha(layer, mode)) * B, A


def _alpha(layer: ResLoraLinear, mode: str) -> torch.Tensor | float:
    if layer.variant == "is" and mode == "merge_bi":
        if not layer.prev:
            return 1.0
        return _norms(layer.prev[0], mode)[0] / _norms(layer, mode)[0]
    if layer.variant == "is":  # merge_bw
        chain = layer.chain.layers
        i = layer.chain.position(layer)
        if i < 2:
            return 1.0
        return _weight_norm(chain[i - 2]) / _weight_norm(chain[i - 1])
    # ms, merge_bi
    if not layer.prev:
        return 0.0
    return sum(_norms(p, mode)[1] for p in layer.prev) / _norms(layer, mode)[1]


def _compute_dtype(layer: ResLoraLinear) -> torch.dtype:
    """float32 for half-precision weights, the weights' own dtype when that is wider (float64)."""
    return torch.promote_types(layer.weight.dtype, torch.float32)


def _as_stored(layer: ResLoraLinear, delta: torch.Tensor) -> torch.Tensor:
    """An (out x in) update in the layout of the base weight: transformers' Conv1D stores it as (in x out)."""
    return delta.T if layer.fan_in_fan_out else delta


def _weight_norm(layer: ResLoraLinear) -> torch.Tensor:
    dtype = _compute_dtype(layer)
    delta = _as_stored(layer, layer.delta_weight().detach().to(dtype))
    return torch.linalg.matrix_norm(layer.weight.detach().to(dtype) + delta)


def _branch(layer: ResLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """B A x for rows x (no scaling, no dropout)."""
    return (x @ layer.lora_A.to(x.dtype).T) @ layer.lora_B.to(x.dtype).T


@torch.no_grad()
def fit_merge_ls(model, batches, ridge: float = 1e-4) -> None:
    """Fit merge_ls on calibration ``batches`` (dicts of keyword arguments or tensors), in eval mode.

    Each ``is``/``ms`` block gets ``ls_solution`` (alpha, or A*); ``ridge`` is relative to the mean
    eigenvalue of the inputs' Gram matrix."""
    check_not_merged(model, "fit merge_ls")
    layers = [m for m in model.named_reslora_layers().values() if m.variant in ("is", "ms")]
    inputs: dict = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0])) for layer in layers]
    sums = {layer: [0.0, 0.0] for layer in layers}  # is: <u, v>, <u, u>; ms: X^T Y, X^T X
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            seen += 1
            inputs.clear()
            model(**batch) if isinstance(batch, dict) else model(batch)
            for layer in layers:
                x = inputs[layer].reshape(-1, layer.in_features).to(_compute_dtype(layer))
                if layer.variant == "is":
                    x_prev = inputs[layer.prev[0]].reshape(x.shape).to(x.dtype) if layer.prev else x
                    u, v = _branch(layer, x), _branch(layer, x_prev)
                    sums[layer][0] += (u * v).sum()
                    sums[layer][1] += (u * u).sum()
                else:
                    y = sum(inputs[b].reshape(x.shape).to(x.dtype) @ b.lora_A.to(x.dtype).T for b in (layer, *layer.prev))
                    sums[layer][0] += x.T @ y  # in x r
                    sums[layer][1] += x.T @ x  # in x in
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("fit_merge_ls got no calibration batches; pass an iterable of training batches")
    for layer in layers:
        cross, gram = sums[layer]
        if layer.variant == "is":
            layer.ls_solution = cross / gram if float(gram) > 0 else torch.tensor(1.0)
        else:
            damping = ridge * torch.trace(gram) / gram.shape[0]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            layer.ls_solution = torch.linalg.solve(gram + damping * eye, cross).T


@torch.no_grad()
def merged_weights(model, mode: str) -> dict[ResLoraLinear, torch.Tensor]:
    """W*_n for every ResLoRA block of ``model`` in ``mode``, in the layout and dtype of the block's base weight."""
    _check_mode(mode)
    check_not_merged(model, f"merge ({mode})")
    merged = {}
    for layer in model.named_reslora_layers().values():
        B, A = low_rank_factors(layer, mode)
        dtype = _compute_dtype(layer)
        delta = layer.scaling * (B.to(dtype) @ A.to(dtype))
        merged[layer] = (layer.weight.to(dtype) + _as_stored(layer, delta)).to(layer.weight.dtype)
    return merged


@torch.no_grad()
def delta_norms(model, mode: str) -> dict[str, dict[str, float]]:
    """Per block: ||s B_n A_n||_F (its own LoRA update) and ||W*_n - W_n||_F (the merged update in ``mode``)."""
    merged = merged_weights(model, mode)
    return {name: {"own": float(torch.linalg.matrix_norm(layer.delta_weight().float())),
                   "merged": float(torch.linalg.matrix_norm((merged[layer] - layer.weight).float()))}
            for name, layer in model.named_reslora_layers().items()}


@torch.no_grad()
def export_peft_adapter(model, directory: str | Path, mode: str, task_type: str | None = INFERRED) -> None:
    """Write the merged model as a PEFT LoRA adapter: per block the factors (B*, A*) of
    ``low_rank_factors`` at the adapter's own scaling s, so ``bs`` blocks have rank (k+1) r. ``task_type`` is
    PEFT's (``"SEQ_2_SEQ_LM"``, ...; None: none, PEFT's plain ``PeftModel``), by default the adapter's own. Needs
    peft (imported here only: the library itself does not)."""
    from peft import LoraConfig

    _check_mode(mode)
    check_not_merged(model, "export a PEFT adapter")
    config = model.reslora_config
    task_type = config.task_type if task_type == INFERRED else task_type
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in model.named_reslora_layers().items():
        B, A = low_rank_factors(layer, mode)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        if A.shape[0] != config.r:
            rank_pattern[name] = A.shape[0]
            alpha_pattern[name] = layer.scaling * A.shape[0]
    # PEFT keeps a sequence classifier's head with the adapter for SEQ_CLS, trained or not: every module whose name
    # ends with "classifier" or "score" (its rule: DistilBERT's pre_classifier too), with all its parameters
    heads = SEQ_CLS_HEADS if task_type == "SEQ_CLS" else ()

    def in_head(name: str) -> bool:
        parts = name.split(".")
        return bool(heads) and any(".".join(parts[:i]).endswith(heads) for i in range(1, len(parts)))

    for name, param in model.base_model.named_parameters():
        if (param.requires_grad or in_head(name)) and not name.endswith((".lora_A", ".lora_B")):
            tensors[f"base_model.model.{name}"] = param.detach()
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in model.named_reslora_layers().values())  # Conv1D
    peft_config = LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules=list(model.named_reslora_layers()), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        modules_to_save=config.modules_to_save or None, base_model_name_or_path=config.base_model_name_or_path,
        task_type=task_type, fan_in_fan_out=fan_in_fan_out)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
