"""The library installs alone: a fresh venv with torch (the pinned CPU build) and this package, nothing of the
experiment platform, imports reslora and wraps, trains, merges, saves and loads a small model. Slow (make test-slow)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = next(line.split()[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.startswith("torch=="))

SCRIPT = textwrap.dedent("""
    import importlib.util, torch
    from torch import nn
    from reslora import ResLoraConfig, ResLoraModel, get_reslora_model
    assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("transformers") is None
    def make_base():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
    model = get_reslora_model(make_base(), ResLoraConfig(variant="bs", r=2, target_modules=r".*\\.0", pre_num=1))
    x = torch.randn(4, 8)
    model(x).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.merge_and_unload("merge_bi")(x), model(x))
    model.save_pretrained("adapter")  # safetensors' torch API needs numpy: a dependency of the library
    loaded = ResLoraModel.from_pretrained(make_base(), "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    print("library alone: ok")
""")


@pytest.mark.slow
def test_the_library_installs_and_works_without_the_platform(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True, timeout=900)  # pinned first: the CPU build (see requirements.txt)
    subprocess.run([*pip, str(ROOT)], check=True, timeout=900)
    result = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "library alone: ok" in result.stdout
