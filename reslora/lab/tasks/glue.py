"""GLUE (the paper's Table 2): data from the Hugging Face hub or a local mirror, official metrics.

Splits: GLUE's test labels are private, so as in the paper the reported number is on the GLUE dev set
("test" here). Model selection uses a validation split carved from train with a fixed seed, never the
dev set (the authors selected on it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_dataset
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from ..hub_models import resolve_model_path
from . import seeded_parts
from .mirror import verify_mirror_file

HUB_ID = "nyu-mll/glue"
NLI_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class GlueSpec:
    folder: str                      # directory in the GLUE download layout
    keys: tuple[str, ...]            # text fields, named as on the hub
    num_labels: int                  # 1 = regression (STS-B)
    headline: str                    # the metric the paper reports and selection uses
    metrics: tuple[str, ...]
    columns: dict                    # hub name -> column header in the mirror TSV
    labels: dict | None = None       # mirror label text -> hub label id
    header: tuple[str, ...] | None = None   # for files without a header row (CoLA)
    dev: str = "dev.tsv"
    dev_hub: str = "validation"
    extra_test: tuple[str, str, str] | None = None   # (name, mirror file, hub split), MNLI mismatched


GLUE = {
    "cola": GlueSpec("CoLA", ("sentence",), 2, "matthews", ("matthews",),
                     {"sentence": "sentence", "label": "label"}, header=("source", "label", "mark", "sentence")),
    "sst2": GlueSpec("SST-2", ("sentence",), 2, "accuracy", ("accuracy",), {"sentence": "sentence", "label": "label"}),
    "mrpc": GlueSpec("MRPC", ("sentence1", "sentence2"), 2, "accuracy", ("accuracy", "f1"),
                     {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "qqp": GlueSpec("QQP", ("question1", "question2"), 2, "accuracy", ("accuracy", "f1"),
                    {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
    "mnli": GlueSpec("MNLI", ("premise", "hypothesis"), 3, "accuracy", ("accuracy",),
                     {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                     labels={"entailment": 0, "neutral": 1, "contradiction": 2}, dev="dev_matched.tsv",
                     dev_hub="validation_matched",
                     extra_test=("mismatched", "dev_mismatched.tsv", "validation_mismatched")),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), 2, "accuracy", ("accuracy",),
                     {"question": "question", "sentence": "sentence", "label": "label"}, labels=NLI_LABELS),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), 2, "accuracy", ("accuracy",),
                    {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, labels=NLI_LABELS),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), 1, "pearson", ("pearson", "spearman"),
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), 2, "accuracy", ("accuracy",),
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
}


def compute_metrics(names, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Official GLUE metrics, via scikit-learn and SciPy."""
    scorers = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions),
        "matthews": lambda: matthews_corrcoef(labels, predictions),
        "pearson": lambda: pearsonr(predictions, labels)[0],
        "spearman": lambda: spearmanr(predictions, labels)[0],
    }
    return {name: float(scorers[name]()) for name in names}


def _missing(task: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"GLUE task {task!r} needs {path}, which does not exist. Provide it in one of two ways: (1) leave "
        f"DATA_MIRROR (config key data.mirror) unset to read {HUB_ID} from the Hugging Face hub (needs "
        f"internet), or (2) put the GLUE files in {path.parent}/ (train.tsv, dev.tsv as written by "
        "download_glue_data.py), point DATA_MIRROR at the directory that holds the task folders, and list each file "
        "with its sha256 in that directory's manifest.json (or set data.allow_unlisted=true to read them unverified).")


def read_mirror_split(task: str, mirror: Path, filename: str, cache_dir: str | Path | None = None,
                      allow_unlisted: bool = False) -> Dataset:
    """One GLUE file of the mirror, verified against the mirror's manifest (``verify_mirror_file``), refused naming
    the file and line when it is not UTF-8, holds no examples, or a row or label the task does not accept. ``idx``
    is the example's row in the file (0 = the first data row): a stable id for per-item predictions."""
    spec = GLUE[task]
    # The mirror holds the task folders directly or under glue_data/ (download_glue_data.py's output).
    root = Path(mirror) / "glue_data" if (Path(mirror) / "glue_data").is_dir() else Path(mirror)
    path = root / spec.folder / filename
    if not path.is_file():
        raise _missing(task, path)
    verify_mirror_file(Path(mirror), path, cache_dir, allow_unlisted)
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.reader(io.StringIO(_utf8_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty; restore it from its source")
    header, rows, first_line = (spec.header, rows, 1) if spec.header else (tuple(rows[0]), rows[1:], 2)
    missing = [col for col in spec.columns.values() if col not in header]
    if missing:
        raise ValueError(f"{path}: header {list(header)} lacks the column(s) {missing} that GLUE {task!r} needs")
    if not rows:
        raise ValueError(f"{path} holds no examples (a header only); restore it from its source")
    for line, row in enumerate(rows, start=first_line):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)}; the file "
                             "is truncated or malformed (compare it with the mirror's manifest.json)")
    index = {name: header.index(col) for name, col in spec.columns.items()}
    data = {name: [row[i] for row in rows] for name, i in index.items()}
    label_of, accepted = _label_reader(spec)
    labels = []
    for line, value in enumerate(data["label"], start=first_line):
        label = label_of(value)
        if label is None:
            raise ValueError(f"{path}, line {line}: label {value!r} is not one of the accepted values ({accepted})")
        labels.append(label)
    data["label"], data["idx"] = labels, list(range(len(rows)))
    return Dataset.from_dict(data)


def _utf8_text(path: Path) -> str:
    """The file's text (a leading BOM dropped, as the GLUE script writes MRPC); a file that is not UTF-8 is
    refused naming the line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 ({error.reason} at byte {error.start}); GLUE files are "
                         "UTF-8: restore it from its source") from None


def _label_reader(spec: GlueSpec):
    """(label of a value as the file holds it, or None when the task does not accept it; the accepted values, for an
    error): a listed text, a class id below ``num_labels``, or (STS-B) a finite score. Built once per file."""
    if spec.num_labels == 1:
        def score(value: str) -> float | None:
            try:
                number = float(value)
            except ValueError:
                return None
            return number if math.isfinite(number) else None
        return score, "a finite number"
    labels = spec.labels or {str(i): i for i in range(spec.num_labels)}
    return labels.get, str(sorted(labels) if spec.labels else list(labels))


class GlueTask:
    """One GLUE task: datasets, collate, loss and evaluation for the shared training loop."""

    family = "glue"

    def __init__(self, cfg, data_cfg, seed: int):
        if cfg.name not in GLUE:
            raise ValueError(f"task.name={cfg.name!r} is not a GLUE task; choose one of {sorted(GLUE)}")
        self.name = cfg.name
        self.spec = GLUE[cfg.name]
        self.headline = self.spec.headline
        self.data_cfg = data_cfg
        self.seed = seed

    # ---- model ----------------------------------------------------------------------------------------
    def load_model(self, model_cfg):
        path = resolve_model_path(model_cfg.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=self.spec.num_labels)

    # ---- data -----------------------------------------------------------------------------------------
    def _raw_split(self, which: str) -> Dataset:
        """``which`` is ``train``, ``dev`` or an extra test split's name."""
        mirror = self.data_cfg.mirror
        spec = self.spec
        if mirror:
            filename = {"train": "train.tsv", "dev": spec.dev}.get(which) or spec.extra_test[1]
            return read_mirror_split(self.name, Path(mirror), filename, self.data_cfg.cache_dir,
                                     self.data_cfg.allow_unlisted)
        split = {"train": "train", "dev": spec.dev_hub}.get(which) or spec.extra_test[2]
        try:
            return load_dataset(HUB_ID, self.name, split=split)
        except ConnectionError as error:
            raise ConnectionError(f"{error}. Without internet, point DATA_MIRROR (config key data.mirror) at a "
                                  f"directory holding the GLUE files ({spec.folder}/train.tsv, {spec.folder}/"
                                  f"{spec.dev})") from error

    def _tokenized(self, which: str) -> Dataset:
        raw = self._raw_split(which)
        key = hashlib.sha1(f"{raw._fingerprint}|{self.tokenizer.name_or_path}|{self.data_cfg.max_length}".encode())
        cache = Path(self.data_cfg.cache_dir) / "glue" / f"{self.name}-{which}-{key.hexdigest()[:16]}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)

        def tokenize(batch):
            texts = [batch[k] for k in self.spec.keys]
            return self.tokenizer(*texts, truncation=True, max_length=self.data_cfg.max_length)

        tokenized = raw.map(tokenize, batched=True, cache_file_name=str(cache),
                            remove_columns=[c for c in raw.column_names if c not in ("label", "idx")])
        return tokenized.rename_column("label", "labels")

    def datasets(self) -> dict[str, Dataset]:
        """train / validation (carved from train with a fixed seed) / test (GLUE dev), subsampled per the
        scale config; subsets are drawn with the data seed so every method sees the same examples."""
        cfg = self.data_cfg
        train = self._tokenized("train")
        parts = seeded_parts(len(train), cfg.split_seed, {"validation": min(cfg.val_samples, len(train) // 5),
                                                          "train": cfg.max_train_samples or None})
        splits = {name: train.select(index) for name, index in parts.items()}
        splits["train"] = splits["train"].remove_columns("idx")
        tests = {"test": "dev"}
        if self.spec.extra_test:
            tests[f"test_{self.spec.extra_test[0]}"] = self.spec.extra_test[0]
        for name, which in tests.items():
            test = self._tokenized(which)
            if cfg.max_test_samples and len(test) > cfg.max_test_samples:
                test = test.select(seeded_parts(len(test), cfg.split_seed, {"test": cfg.max_test_samples})["test"])
            splits[name] = test
        return splits

    def collate(self):
        return DataCollatorWithPadding(self.tokenizer)

    def model_inputs(self, batch: dict, generator=None) -> dict:
        return {k: v for k, v in batch.items() if k not in ("labels", "idx")}

    def loss(self, model, batch) -> torch.Tensor:
        return model(**self.model_inputs(batch), labels=batch["labels"]).loss

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict:
        """The metrics, and under ``items`` each example's id (its row in the source file), prediction (class,
        or score for STS-B, the float32 value unrounded, so that the metric recomputes exactly) and label: what
        paired statistics over test items need."""
        model.eval()
        ids, predictions, labels = [], [], []
        for batch in loader:
            logits = model(**self.model_inputs(batch)).logits
            pred = logits.squeeze(-1) if self.spec.num_labels == 1 else logits.argmax(-1)
            pred, label, idx = accelerator.gather_for_metrics((pred, batch["labels"], batch["idx"]))
            predictions.append(pred.float().cpu())
            labels.append(label.float().cpu())
            ids.append(idx.cpu())
        predictions, labels = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        if self.spec.num_labels > 1:
            predictions, labels = predictions.astype(int), labels.astype(int)
        items = {"id": torch.cat(ids).tolist(), "label": labels.tolist(),
                 "prediction": predictions.tolist()}
        return {**compute_metrics(self.spec.metrics, predictions, labels), "items": items}
