"""Turn a method config (conf/method/*.yaml) into an adapted model: ours or an HF PEFT baseline."""

from __future__ import annotations

from contextlib import contextmanager

from omegaconf import OmegaConf
from peft import get_peft_config, get_peft_model

from ..config import ResLoraConfig
from ..model import ResLoraModel, get_reslora_model

PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")


def apply_method(model, method_cfg, model_cfg, total_steps: int):
    """Wrap ``model`` with the method. ``model_cfg`` supplies the targets and the head kept trainable;
    ``total_steps`` is needed by AdaLoRA's rank schedule."""
    targets = list(model_cfg.target_modules)
    head = list(model_cfg.modules_to_save)
    if method_cfg.kind == "reslora":
        return get_reslora_model(model, ResLoraConfig(
            variant=method_cfg.variant, r=method_cfg.r, lora_alpha=method_cfg.lora_alpha,
            lora_dropout=method_cfg.lora_dropout, target_modules=targets, pre_num=method_cfg.pre_num,
            window=method_cfg.window, modules_to_save=head, layer_order=list(model_cfg.get("layer_order", [])),
            base_model_name_or_path=model_cfg.path,
            # only the ablation's method configs name it, so the other rows' configs (and records) are unchanged
            detach_shortcut=method_cfg.get("detach_shortcut", False)))
    if method_cfg.kind == "peft":
        options = OmegaConf.to_container(method_cfg.peft, resolve=True)
        if options.get("peft_type") not in PEFT_TYPES:
            raise ValueError(f"method.peft.peft_type={options.get('peft_type')!r}; choose one of {list(PEFT_TYPES)}")
        if options["peft_type"] == "ADALORA":
            options["total_step"] = total_steps
        options.update(target_modules=targets, modules_to_save=head or None)
        return get_peft_model(model, get_peft_config(options))
    raise ValueError(f"method.kind={method_cfg.kind!r}; choose 'reslora' or 'peft' (or 'none': no adapter, "
                     "no training, a reference row)")


def eval_modes(method_cfg) -> list[str]:
    """Evaluation modes recorded for the method; the first is the headline one."""
    if method_cfg.kind == "reslora":
        return list(method_cfg.eval_modes)
    return ["unmerged"]


@contextmanager
def evaluated_as(model, mode: str, calibration=None):
    """The model to evaluate in ``mode``: the training graph itself (``unmerged``), or the same model merged in
    place for the block (``ResLoraModel.merged``: no copy of the base model). ``calibration()`` yields training
    batches, for the least-squares merge."""
    if mode == "unmerged":
        yield model
        return
    if not isinstance(model, ResLoraModel):
        raise ValueError(f"eval mode {mode!r} applies to ResLoRA models only")
    if mode == "merge_ls":
        model.fit_merge_ls(calibration())
    with model.merged(mode):
        yield model
