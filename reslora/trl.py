"""TRL's ``SFTTrainer`` for a ResLoraModel (needs ``trl``; imported only here, not by ``import reslora``).

    from reslora.trl import ResLoraSFTTrainer
    trainer = ResLoraSFTTrainer(model=get_reslora_model(base, config), args=SFTConfig(...), train_dataset=...)

``SFTTrainer`` gives the model it trains a fused LM head: a forward that runs ``self.base_model``, transformers'
name for the backbone, and returns per-token log-probabilities instead of logits. A ``PeftModel`` gets it on its
inner transformers model. A ResLoraModel's ``base_model`` is the whole transformers model, so ``SFTTrainer`` given
one fails (``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``); this subclass puts the head
on the transformers model, as for PEFT. Everything else is ``SFTTrainer``'s own: gradient checkpointing (its
default) goes through the wrapper, which keeps the residual paths; checkpoints and ``save_model`` hold the adapter
(``ResLoraModel.from_pretrained(base, directory)`` loads them) and ``resume_from_checkpoint`` restores it.
"""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from .layers import ResLoraLinear
from .model import ResLoraModel

# The per-token fields SFTTrainer.compute_loss reads off the fused head (its loss and its metrics)
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class ResLoraSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` that trains a ``ResLoraModel`` (any other model: exactly ``SFTTrainer``)."""

    def __init__(self, model, *args, **kwargs):
        if isinstance(model, ResLoraModel) and isinstance(model.get_output_embeddings(), ResLoraLinear):
            raise ValueError("a ResLoRA adapter on the LM head is not supported by SFTTrainer: its fused LM head "
                             "multiplies by lm_head.weight directly, so the adapter would never train; remove the "
                             "LM head from target_modules")
        super().__init__(model, *args, **kwargs)
        if isinstance(self.model, ResLoraModel):
            del self.model.forward  # SFTTrainer's fused head on the wrapper: its backbone call would run the LM
            add_fused_lm_head(self.model.base_model, outputs=FUSED_OUTPUTS)
