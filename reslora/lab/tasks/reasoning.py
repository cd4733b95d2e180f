"""Math and commonsense reasoning (the paper's Table 1): GSM8K, SVAMP, MathQA, MetaMathQA, HellaSwag.

Prompts and targets follow the authors' formats: GSM8K rationales without the calculator annotations
``<<...>>`` and with the final line "The answer is N."; SVAMP "{Equation}. The answer is {Answer}.";
MathQA and HellaSwag as lettered multiple choice answered by the letter. The loss covers the target tokens
only. Evaluation generates greedily and reads the answer after "The answer is".

Splits: model selection uses a validation split carved from the training data with a fixed seed, never
the test split (the authors selected on test). Offline, what the mirror holds decides the splits: SVAMP's
1,000 items are split 700/300 (train/test) with a fixed seed, as the hub version's sizes; MathQA has only
dev and test, so training uses a seeded part of dev and validation the rest of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from . import seeded_parts
from .mirror import verify_mirror_file

ANSWER_PREFIX = "The answer is"
LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str    # what the model learns to write after the prompt
    answer: str    # the gold answer: a number as text, or a letter
    kind: str      # "number" or "choice"
    id: int = -1   # the item's index in its source file (or hub split): a stable id for per-item predictions


# ---- formats ----------------------------------------------------------------------------------------------
def number_text(value: float | str) -> str:
    """51.0 -> '51', 0.5 -> '0.5', '1,234' -> '1234'."""
    number = float(str(value).replace(",", ""))
    return str(int(number)) if number.is_integer() else f"{number:g}"


def gsm8k_example(item: dict) -> Example:
    rationale, _, final = item["answer"].rpartition("####")
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
    answer = number_text(final.strip())
    return Example(f"Question: {item['question']}\nAnswer:", f" {rationale}\n{ANSWER_PREFIX} {answer}.", answer, "number")


def svamp_example(item: dict) -> Example:
    answer = number_text(item["Answer"])
    question = f"{item['Body'].strip()} {item['Question'].strip()}"
    return Example(f"Question: {question}\nAnswer:", f" {item['Equation'].strip()}. {ANSWER_PREFIX} {answer}.",
                   answer, "number")


def mathqa_example(item: dict) -> Example:
    options = item["options"].strip().strip("[]'\"")
    return Example(f"Question: {item['Problem'].strip()}\nOptions: {options}\nAnswer:",
                   f" {ANSWER_PREFIX} {item['correct'].strip()}.", item["correct"].strip(), "choice")


def metamathqa_example(item: dict) -> Example:
    response = item["response"].strip()
    answer = response.rpartition("The answer is:")[2].strip()
    return Example(f"Question: {item['query'].strip()}\nAnswer:", f" {response}", answer, "number")


def hellaswag_example(item: dict) -> Example:
    endings = " ".join(f"{LETTERS[i]} ) {e.strip()}" for i, e in enumerate(item["endings"]))
    letter = LETTERS[int(item["label"])]
    return Example(f"Context: {item['ctx'].strip()}\nEndings: {endings}\nAnswer:", f" {ANSWER_PREFIX} {letter}.",
                   letter, "choice")


def extract_answer(text: str, kind: str) -> str | None:
    """The answer after the first "The answer is" (a number, or a letter), or None."""
    _, found, rest = text.partition(ANSWER_PREFIX)
    if not found:
        return None
    rest = rest.lstrip(" :")
    if kind == "choice":
        match = re.match(r"\(?([a-jA-J])\b", rest)
        return match.group(1).lower() if match else None
    match = re.match(r"\$?\s*(-?[\d,]*\.?\d+)", rest)
    if not match:
        return None
    try:
        return number_text(match.group(1))
    except ValueError:
        return None


def answer_complete(text: str) -> bool:
    """Whether generating more can no longer change what ``extract_answer`` reads: "The answer is", then the
    answer's first character, then a line break (neither a number nor a letter answer continues across one)."""
    _, found, rest = text.partition(ANSWER_PREFIX)
    return bool(found) and "\n" in rest.lstrip()


def is_correct(prediction: str | None, answer: str, kind: str, tolerance: float = 1e-4) -> bool:
    if prediction is None:
        return False
    if kind == "choice":
        return prediction == answer
    try:
        return abs(float(prediction) - float(answer.replace(",", ""))) <= tolerance * max(1.0, abs(float(answer.replace(",", ""))))
    except ValueError:
        return False


# ---- data: the local mirror ---------------------------------------------------------------------------------
MIRROR_FILES = {"gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                "svamp": {"all": "svamp/SVAMP.json"},
                "mathqa": {"dev": "mathqa/dev.json", "test": "mathqa/test.json"}}
HUB = {"gsm8k": ("gsm8k", "main"), "svamp": ("ChilleD/SVAMP", None), "mathqa": ("math_qa", None),
       "metamathqa": ("meta-math/MetaMathQA", None), "hellaswag": ("Rowan/hellaswag", None)}
FORMATS = {"gsm8k": gsm8k_example, "svamp": svamp_example, "mathqa": mathqa_example,
           "metamathqa": metamathqa_example, "hellaswag": hellaswag_example}


def _read(path: Path) -> list[dict]:
    """The items of a JSON or JSON-lines file, each with ``_row``: its index in the file (a stable id)."""
    if path.suffix == ".jsonl":
        items = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {line_number}: not a JSON object ({error}); the file is "
                                     "truncated or malformed") from error
    else:
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); the file is truncated or malformed") from error
    return [{**item, "_row": i} for i, item in enumerate(items)]


def mirror_splits(task: str, mirror: Path, split_seed: int, cache_dir: str | Path | None = None,
                  allow_unlisted: bool = False) -> tuple[dict[str, list[dict]], str]:
    """Raw items per split ('train', 'test', and for MathQA 'validation') from the mirror, and a note."""
    if task not in MIRROR_FILES:
        raise FileNotFoundError(
            f"task {task!r} is not in the local mirror {mirror} (it holds {sorted(MIRROR_FILES)}): read it from "
            f"the hub ({HUB[task][0]}) by leaving DATA_MIRROR unset on a machine with internet")
    files = {split: Path(mirror) / name for split, name in MIRROR_FILES[task].items()}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"task {task!r} needs {path}, which does not exist: put the file there or leave "
                                    f"DATA_MIRROR unset to read {HUB[task][0]} from the hub")
        verify_mirror_file(Path(mirror), path, cache_dir, allow_unlisted)
    if task == "gsm8k":
        return {"train": _read(files["train"]), "test": _read(files["test"])}, "official train/test"
    if task == "svamp":
        items = _read(files["all"])
        parts = seeded_parts(len(items), split_seed, {"train": 700, "test": None})
        return ({split: [items[i] for i in part] for split, part in parts.items()},
                "1,000 items split 700/300 (train/test) with a fixed seed")
    dev = _read(files["dev"])
    return ({"train": dev, "test": _read(files["test"])},
            "no train split offline: training and validation are drawn from dev; test is the official test")


def hub_splits(task: str) -> dict[str, list[dict]]:
    from datasets import load_dataset

    path, name = HUB[task]
    try:
        data = load_dataset(path, name)
    except ConnectionError as error:
        raise ConnectionError(f"{error}. Without internet, point DATA_MIRROR at a local mirror holding "
                              f"{MIRROR_FILES.get(task, 'this task (not mirrored offline)')}") from error
    # HellaSwag's test labels are private: report on validation, as the authors did. MetaMathQA has no test
    # split of its own (it is scored on GSM8K's).
    test = {"hellaswag": "validation", "metamathqa": None}.get(task, "test")
    return {split: [{**item, "_row": i} for i, item in enumerate(data[name])] if name else []
            for split, name in (("train", "train"), ("test", test))}


# ---- the task object for the shared loop ----------------------------------------------------------------------
class ReasoningTask:
    """Generation tasks scored by accuracy of the extracted answer."""

    family = "reasoning"
    headline = "accuracy"

    def __init__(self, cfg, data_cfg, seed: int):
        if cfg.name not in FORMATS:
            raise ValueError(f"task.name={cfg.name!r} is not a reasoning task; choose one of {sorted(FORMATS)}")
        self.name, self.cfg, self.data_cfg = cfg.name, cfg, data_cfg

    def load_model(self, model_cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..hub_models import SMOLLM2_PATH, load_smollm2

        if model_cfg.path == SMOLLM2_PATH:
            model, self.tokenizer = load_smollm2(self.data_cfg.cache_dir)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=model_cfg.get("dtype", "auto"))
            self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return model

    def examples(self) -> tuple[dict[str, list[Example]], str]:
        cfg = self.data_cfg
        if cfg.mirror:
            raw, note = mirror_splits(self.name, Path(cfg.mirror), cfg.split_seed, cfg.cache_dir, cfg.allow_unlisted)
        else:
            raw, note = hub_splits(self.name), "hub splits"
        if self.name == "metamathqa":  # the authors score MetaMathQA training on the GSM8K test set
            raw["test"] = (mirror_splits("gsm8k", Path(cfg.mirror), cfg.split_seed, cfg.cache_dir,
                                         cfg.allow_unlisted)[0] if cfg.mirror
                           else hub_splits("gsm8k"))["test"]
        fmt = FORMATS[self.name]
        train = [replace(fmt(item), id=item["_row"]) for item in raw["train"]]
        test_fmt = gsm8k_example if self.name == "metamathqa" else fmt
        test = [replace(test_fmt(item), id=item["_row"]) for item in raw["test"]]
        parts = seeded_parts(len(train), cfg.split_seed, {"validation": min(cfg.val_samples, len(train) // 5),
                                                          "train": cfg.max_train_samples or None})
        if cfg.max_test_samples and len(test) > cfg.max_test_samples:
            test = [test[i] for i in seeded_parts(len(test), cfg.split_seed, {"test": cfg.max_test_samples})["test"]]
        return {**{split: [train[i] for i in part] for split, part in parts.items()}, "test": test}, note

    def datasets(self):
        from datasets import Dataset

        splits, self.split_note = self.examples()
        tok, limit = self.tokenizer, self.data_cfg.max_length

        def training_row(ex: Example) -> dict:
            prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            prompt = prompt[-max(1, limit - len(target)):]  # keep the end of a long prompt
            ids = (prompt + target)[:limit]
            return {"input_ids": ids, "labels": ([-100] * len(prompt) + target)[:limit]}

        def generation_row(ex: Example) -> dict:
            ids = tok(ex.prompt, add_special_tokens=False)["input_ids"][-limit:]
            return {"input_ids": ids, "answer": ex.answer, "kind": ex.kind, "id": ex.id}

        out = {"train": Dataset.from_list([training_row(e) for e in splits["train"]])}
        for name in ("validation", "test"):
            out[name] = Dataset.from_list([generation_row(e) for e in splits[name]])
        return out

    def collate(self):
        pad = self.tokenizer.pad_token_id

        def collate(rows: list[dict]) -> dict:
            import torch

            width = max(len(r["input_ids"]) for r in rows)
            if "labels" in rows[0]:  # training: pad on the right, no loss on padding
                ids = [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]
                labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
                mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
                return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                        "labels": torch.tensor(labels)}
            # generation: pad on the left so every prompt ends where generation starts
            ids = [[pad] * (width - len(r["input_ids"])) + r["input_ids"] for r in rows]
            mask = [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                    "answer": [r["answer"] for r in rows], "kind": [r["kind"] for r in rows],
                    "id": [r["id"] for r in rows]}

        return collate

    def model_inputs(self, batch: dict, generator=None) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss(self, model, batch):
        return model(**self.model_inputs(batch), labels=batch["labels"]).loss

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        import torch

        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = self.tokenizer

        class AnswerComplete(StoppingCriteria):
            """Ends each sequence once its answer is complete (the extracted answer is then final)."""

            def __init__(self, prompt_width: int):
                self.prompt_width = prompt_width

            def __call__(self, input_ids, scores, **kwargs):
                texts = tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
                return torch.tensor([answer_complete(t) for t in texts], device=input_ids.device)

        model.eval()
        correct, items = [], {"id": [], "prediction": [], "correct": []}
        with torch.no_grad():
            for batch in loader:
                width = batch["input_ids"].shape[1]
                generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id,
                                           stopping_criteria=StoppingCriteriaList([AnswerComplete(width)]))
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                answers = [extract_answer(t, k) for t, k in zip(texts, batch["kind"])]
                flags = [is_correct(p, a, k) for p, a, k in zip(answers, batch["answer"], batch["kind"])]
                items["id"] += batch["id"]
                items["prediction"] += answers
                items["correct"] += flags
                correct.append(accelerator.gather_for_metrics(torch.tensor(flags, dtype=torch.float32,
                                                                           device=batch["input_ids"].device)))
        # items: this process's share (ids, extracted answers, correct or not); single-process runs hold all
        return {"accuracy": float(torch.cat(correct).mean()), "items": items}
