"""`make bench` works: its quick mode runs every contestant on both float32 workloads (and, slow, the bf16 one) and
writes a complete report.
Speed is not asserted here (the numbers of a quick run on a busy test machine mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from bench_report import BASE, BASE_CONTROL, CONTESTANTS, TARGETS  # noqa: E402


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_quick_bench_reports_every_contestant(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["threads"] == 1 and report["meta"]["quick"] is True
    assert len(report["meta"]["loadavg_start"]) == 3
    assert set(report["workloads"]) == {"minilm", "smollm2"}  # smollm2_bf16: test_quick_bf16_bench
    keys = [c.key for c in CONTESTANTS]
    for name, work in report["workloads"].items():
        assert list(work["train"]) == keys, name
        assert set(work["merge"]) == set(keys), name
        assert set(work["inference"]) == {BASE, BASE_CONTROL, *keys}, name
        for key in keys:
            train = work["train"][key]
            for field in ("step_s", "peak_bytes", "live_before_bytes", "step_peak_bytes", "peak_vs_lora",
                          "trainable_params"):
                assert positive(train[field]), (name, key, field, train[field])
            assert all(positive(t) for t in train["step_s_rounds"])
            assert positive(train["vs_peft_lora"]["median"]) and positive(train["vs_lora"]["median"])
            assert positive(train["aten_ops"])
            assert positive(work["merge"][key]["merge_s"])
        for key, inference in work["inference"].items():
            assert positive(inference["forward_s"]) and positive(inference["tokens_per_s"]), (name, key)
            assert positive(inference["vs_base"]["median"]) and positive(inference["aten_ops"])
            assert inference["same_structure_as_base"] is True, (name, key)
        # same adapter size everywhere: the residual paths add no parameter
        assert len({work["train"][k]["trainable_params"] for k in keys}) == 1
        assert work["base_dtype"] == "float32" and all(work["train"][k]["trainable_dtypes"] == ["float32"] for k in keys)
    assert len(report["targets"]) == 2 * len(TARGETS)
    assert all(isinstance(t["met"], bool) and positive(t["ratio"]) and t["verdict"] for t in report["targets"])
    text = (tmp_path / "bench.md").read_text()
    assert "thread" in text and "Load average" in text
    assert all(c.label in text for c in CONTESTANTS)
    # bench.md is rebuilt from bench.json alone, with the merged-evaluation memory where it was measured
    (tmp_path / "merge_memory.json").write_text((ROOT / "results" / "merge_memory.json").read_text())
    rebuilt = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--report-only", "--out",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    text = (tmp_path / "bench.md").read_text()
    assert "## Peak memory of a merged evaluation" in text and "| random LLaMA (954M) | is |" in text


def test_the_full_bench_leaves_the_bf16_workload_out_only_without_bf16_instructions_and_says_why(monkeypatch):
    import bench
    from bench_report import markdown

    report = json.loads((ROOT / "results" / "bench.json").read_text())
    for flags, left_out in (({"fpu", "sse", "avx2", "fma"}, True), ({"avx2", "avx512f", "avx512_bf16"}, False),
                            ({"amx_bf16"}, False), (None, False)):
        monkeypatch.setattr(bench, "cpu_flags", lambda flags=flags: flags)
        why = bench.no_bf16_instructions()
        assert (why is not None) is left_out, flags
        work = {w.key: w for w in bench.workloads(quick=False, smollm2_layers=None)}
        assert work["smollm2_bf16"].skip_why == why and work["smollm2"].skip_why is None
    report["meta"]["left_out"] = {"smollm2_bf16": "this CPU has no bf16 instructions"}
    assert "**Left out: `smollm2_bf16`.** This CPU has no bf16 instructions." in markdown(report)


@pytest.mark.slow
def test_quick_bf16_bench_trains_float32_adapters_on_a_bf16_base_beside_peft(tmp_path):
    """Minutes: bf16 matmuls are emulated on CPUs without bf16 instructions."""
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), "--quick", "--only", "smollm2_bf16",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    work = json.loads((tmp_path / "bench.json").read_text())["workloads"]["smollm2_bf16"]
    assert work["base_dtype"] == "bfloat16"
    # float32 adapters for every contestant, PEFT's LoRA included (its default too: the same setting)
    assert [work["train"][c.key]["trainable_dtypes"] for c in CONTESTANTS] == [["float32"]] * len(CONTESTANTS)
    assert all(positive(work["train"][c.key]["step_s"]) for c in CONTESTANTS)
    assert all(inference["same_structure_as_base"] is True for inference in work["inference"].values())
