"""experiments/mechanism.py, the effective-scale prediction: its measurements on models whose consecutive
target-layer inputs are known exactly, and a whole run on a tiny random BERT against the committed records; the
gradient-path ablation's report (reslora/lab/ablation.py) and notebook on smoke records."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _models import BERT
from reslora.lab.ablation import ablation_markdown, ablation_records
from reslora.lab.records import load_records
from test_platform import needs_data, train
from test_reports import execute_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import mechanism  # noqa: E402


class Geometric(nn.Module):
    """Four target layers ``blocks.i.proj`` whose inputs are x / ratio**i: x_{n-1} = ratio * x_n exactly."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(6, 6)}) for _ in range(4))

    def forward(self, x):
        return sum(block["proj"](x / self.ratio ** i) for i, block in enumerate(self.blocks))


def geometric_source(ratio: float, pre_num_bs: int = 1) -> mechanism.Source:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(3, 5, 6)}, {"x": torch.randn(2, 5, 6)}]
    return mechanism.Source("sst2", "geometric", Geometric(ratio), ["proj"], batches, r=2,
                            pre_num={"bs": pre_num_bs, "ms": 2}, records_scale="cpu", records_tag="table2")


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_inputs_proportional_to_the_previous_ones(ratio):
    layers = mechanism.measure(geometric_source(ratio))
    assert [row["position"] for row in layers] == [0, 1, 2, 3]
    for row in layers[1:]:
        assert row["cos"] == pytest.approx(1.0, abs=1e-9)
        assert row["token_cos"] == pytest.approx(1.0, abs=1e-9)
        assert row["norm_ratio"] == pytest.approx(ratio, rel=1e-9)
        assert row["c"] == pytest.approx(ratio, rel=1e-9)
        assert row["is_alpha"] == pytest.approx(ratio, rel=1e-5)  # the library's float32 statistics
    predicted = mechanism.predict(layers, {"bs": 1, "ms": 2})
    # is: 2 for the first block (x_{n-1} := x_n), 1 + ratio for the others
    assert predicted["is"]["deployed"] == pytest.approx((2 + 3 * (1 + ratio)) / 4, rel=1e-5)
    assert predicted["is"]["forward"] == pytest.approx((2 + 3 * (1 + ratio)) / 4, rel=1e-9)
    # bs with pre_num 1: 1 for the first block, sqrt(2) (uncorrelated) or 2 (aligned) for the others
    assert predicted["bs"]["deployed"] == pytest.approx((1 + 3 * math.sqrt(2)) / 4)
    assert predicted["bs"]["deployed_aligned"] == pytest.approx((1 + 3 * 2) / 4)
    # ms (pre_num 2): previous blocks add to the branch from the second block on; the first has none
    assert [row["previous_blocks"] for row in layers] == [0, 1, 2, 2]
    assert layers[0]["ms_forward"] == 1.0 and layers[0]["ms_alpha"] == 0.0
    assert all(row["ms_forward"] != 1.0 and row["ms_alpha"] > 0.0 for row in layers[1:])


def test_bs_blocks_follow_pre_num():
    assert [mechanism.bs_blocks(n, 2) for n in range(5)] == [0, 1, 2, 2, 2]
    assert [mechanism.bs_blocks(n, -1) for n in range(5)] == [0, 1, 2, 3, 4]


def test_update_cosine_of_orthogonal_and_equal_updates():
    # merged_n = |own_n + own_{n-1}|: orthogonal blocks give sqrt(a^2 + b^2), equal ones a + b
    orthogonal = {"x.0.proj": {"own": 3.0, "merged": 3.0}, "x.1.proj": {"own": 4.0, "merged": 5.0}}
    aligned = {"x.0.proj": {"own": 3.0, "merged": 3.0}, "x.1.proj": {"own": 4.0, "merged": 7.0}}
    assert mechanism.update_cosine(orthogonal, []) == pytest.approx(0.0)
    assert mechanism.update_cosine(aligned, []) == pytest.approx(1.0)


def test_chains_of_records_follow_the_library_chain_rule():
    """An encoder's and a decoder's layer of the same name chain apart, as the library chains them."""
    names = [f"{stack}.block.{i}.layer.0.SelfAttention.q" for stack in ("encoder", "decoder") for i in range(2)]
    assert mechanism.chains_of_records(dict.fromkeys(names), []) == [names[:2], names[2:]]


def test_own_ratio_from_controls_interpolates_in_log_scale():
    curve = {1.0: 1.0, 2.0: 1.6, 4.0: 2.4}  # own ratios D(k)/k: 1, 0.8, 0.6
    assert mechanism.own_ratio_from_controls(curve, 1.0) == pytest.approx(1.0)
    assert mechanism.own_ratio_from_controls(curve, math.sqrt(2)) == pytest.approx(0.9)
    assert mechanism.own_ratio_from_controls(curve, 4.0) == pytest.approx(0.6)


def test_a_tiny_random_bert_against_the_committed_records(tmp_path):
    torch.manual_seed(0)
    batches = [BERT.inputs(seed) for seed in range(2)]
    source = mechanism.Source("sst2", "tiny-bert", BERT.build(), list(BERT.targets), batches, r=4,
                              pre_num={"bs": 1, "ms": 4}, records_scale="cpu", records_tag="table2")
    result = mechanism.analyse(source, load_records(ROOT / "results", "cpu", "table2"))
    mechanism.write_outputs([result], tmp_path)

    written = json.loads((tmp_path / "mechanism_scale.json").read_text())["sources"][0]
    assert written["examples"] == 4 and len(written["layers"]) == 6  # 3 layers x (query, value)
    assert all(-1 <= row["cos"] <= 1 and row["norm_ratio"] > 0 for row in written["layers"] if "cos" in row)
    # the committed SST-2 records: ResLoRA_is's first blocks merge with alpha = 1 (factor 2), every row is measured
    # against LoRA on the same seeds, and the controls give the own-ratio curve
    measured = written["measured"]
    assert set(measured) == {"is", "bs", "ms"}
    first_blocks = [f for name, f in measured["is"]["per_layer_factor"].items() if ".layer.0." in name]
    assert first_blocks and all(f == 2.0 for f in first_blocks)
    assert -1 <= measured["bs"]["update_cosine"] <= 1
    assert set(written["controls"]) == {"1.0", "2.0", "4.0"}
    for prediction in written["predicted"].values():
        assert prediction["deployed_with_controls"] == pytest.approx(prediction["deployed"] * prediction["own_ratio"],
                                                                     abs=2e-4)
    text = (tmp_path / "mechanism.md").read_text()
    assert "| SST-2 | ResLoRA_is |" in text and "| SST-2 | tiny-bert | self.query = self.value |" in text
    assert (tmp_path / "figures" / "mechanism_cos_by_layer.png").stat().st_size > 10_000
    # the report rebuilds from the JSON alone (--rebuild), byte for byte
    mechanism.write_outputs(json.loads((tmp_path / "mechanism_scale.json").read_text())["sources"], tmp_path / "again")
    assert (tmp_path / "again" / "mechanism.md").read_bytes() == (tmp_path / "mechanism.md").read_bytes()


@pytest.fixture(scope="module")
def ablation_smoke(tmp_path_factory):
    """Smoke records of the gradient-path ablation on SST-2: Table 2's LoRA, ResLoRA_is and its matched control,
    and the detached row, two seeds each."""
    tmp = tmp_path_factory.mktemp("mechanism")
    train(tmp, "-m", "experiment=table2", "task=sst2", "method=lora,reslora_is,lora_alpha32", "seed=0,1",
          "hydra/launcher=joblib_cpu")
    train(tmp, "-m", "experiment=mechanism", "task=sst2", "method=reslora_is_detached", "seed=0,1",
          "hydra/launcher=joblib_cpu")
    return tmp / "results"


@needs_data
def test_the_gradient_path_ablation_from_smoke_records(ablation_smoke, tmp_path, monkeypatch):
    chosen = ablation_records(ablation_smoke, "smoke")
    assert chosen["table1"] == [] and len(chosen["table2"]) == 8
    text = "\n".join(ablation_markdown(chosen, tmp_path / "figures"))
    for pair in ("ResLoRA_is − ResLoRA_is, shortcut detached",
                 "ResLoRA_is, shortcut detached − LoRA (r=4, alpha=32), control"):
        assert f"| {pair} | SST-2 (Acc) |" in text and f"| {pair} | SST-2 whole run |" in text
    assert "Detached rows: 2 runs" in text and "Family: this table holds 2 comparisons" in text  # accuracy: 2 pairs
    # the relative train-loss difference is recomputed from the records' own losses, per seed
    runs = {(r["method"], r["seed"]): r for r in chosen["table2"]}
    final = {key: np.mean([loss for _, loss in r["train_loss"][-5:]]) for key, r in runs.items()}
    expected = ", ".join(f"{100 * (final['reslora_is', s] / final['reslora_is_detached', s] - 1):+.2f}" for s in (0, 1))
    line = next(row for row in text.splitlines()
                if row.startswith("| ResLoRA_is − ResLoRA_is, shortcut detached | SST-2 final |"))
    assert f"| {expected} |" in line
    assert (tmp_path / "figures" / "mechanism_train_loss_table2.png").stat().st_size > 5_000
    assert "table2: 8 records (2 detached)" in execute_notebook("mechanism.ipynb", ablation_smoke, monkeypatch)
