"""ResLoRA: identity residual mapping in low-rank adaptation (Shi et al., Findings of ACL 2024).

    from reslora import ResLoraConfig, get_reslora_model
    model = get_reslora_model(base, ResLoraConfig(variant="bs", r=4, target_modules=["query", "value"]))
    ...train...
    plain = model.merge_and_unload(mode="merge_bi")
"""

from .config import VARIANTS, ResLoraConfig
from .layers import ResLoraLinear
from .merge import MERGE_MODES, merged_weights
from .model import ResLoraModel, get_reslora_model

__all__ = ["VARIANTS", "MERGE_MODES", "ResLoraConfig", "ResLoraLinear", "ResLoraModel", "get_reslora_model",
           "merged_weights"]
