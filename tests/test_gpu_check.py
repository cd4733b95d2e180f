"""`make gpu-check` works: without CUDA the same script runs on CPU at a smoke size and writes a complete report
(timing of every contestant, the bs merge check, each paper-scale config for 2 steps with a tiny model); a
paper-scale run that does not end in time is a timeout row of the report, and the check goes on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_platform import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import gpu_check  # noqa: E402


@pytest.mark.slow  # three train.py processes (about 75 s of CPU; make test-slow)
def test_the_gpu_check_runs_on_cpu_at_a_smoke_size(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True and report["meta"]["device"] in ("cpu", "cuda")
    rows = report["cost"]["rows"]
    assert set(rows) == {"peft_lora", "lora", "is", "bs1", "ms1"}
    assert all(r["step_s"] > 0 and r["vs_peft_lora"] > 0 and r["step_peak_bytes"] > 0 for r in rows.values())
    assert rows["peft_lora"]["adapter_dtypes"] == ["float32"]  # PEFT keeps adapters in fp32 on any base
    merge = report["cost"]["merge"]
    assert merge["ok"] and merge["not_plain"] == []
    assert merge["bs_max_abs_error"] <= max(2 * merge["lora_max_abs_error"], 1e-5)
    runs = {r["scale"]: r for r in report["paper_runs"]}
    assert set(runs) == {"paper", "paper_nlg", "paper_t2i"}
    for scale, run in runs.items():
        assert run["status"] == "ok" and run["total_steps"] == 2, (scale, run["error"])
        assert "merge_bi" in run["modes"] and "unmerged" in run["modes"], scale
    text = (tmp_path / "gpu_check.md").read_text()
    assert "all checks pass" in text and "| bs, pre_num 1 |" in text and "| paper_t2i | naruto" in text


def test_a_paper_run_past_its_time_is_a_timeout_row_and_the_others_still_run(tmp_path, monkeypatch):
    # no tiny models or data needed: every train.py is killed long before it could read them
    for builder in ("tiny_bert", "tiny_llama", "tiny_stable_diffusion", "synthetic_mirror", "captioned_images"):
        monkeypatch.setattr(gpu_check, builder, lambda directory: None)
    monkeypatch.setattr(gpu_check, "RUN_TIMEOUT_S", 0.1)
    runs = gpu_check.paper_runs(tmp_path, "cpu", "float32")
    assert [r["scale"] for r in runs] == ["paper", "paper_nlg", "paper_t2i"]
    for run in runs:
        assert run["status"] == "timeout" and run["returncode"] is None and run["total_steps"] is None, run
        assert "no result within 0.1 s" in run["error"], run["error"]
    report = {"meta": {"device_name": "test", "git_commit": "abc1234", "date": "today", "torch": "t",
                       "transformers": "t", "peft": "p", "wall_s": 1.0}, "ok": False, "paper_runs": runs,
              "cost": {"parameters": 1, "dtype": "float32", "rows": {},
                       "shape": {"batch_size": 2, "seq_len": 32, "rounds": 1, "warmup": 1},
                       "merge": {"bs_max_abs_error": 0.0, "lora_max_abs_error": 0.0, "not_plain": [], "ok": True}}}
    text = gpu_check.markdown(report)
    assert "some checks FAIL" in text and "| paper_nlg | gsm8k, reslora_bs | timeout |" in text
    assert "paper_t2i failed:" in text and "no result within 0.1 s" in text
