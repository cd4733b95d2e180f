"""ResLoRA under DDP (two gloo processes on CPU): the merge statistics are the same on every rank and equal what one
process that saw the union of the ranks' batches records, so every rank merges into the same W*. Equal up to float32
rounding: the statistics are float32, a rank's records are combined as sqrt(sum of squares)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from _models import TOY
from reslora import merged_weights

WORLD, STEPS, WINDOW = 2, 4, 3  # more steps than the window holds: the windows wrap


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, TOY.dims[0], generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def train(model, forward, shard) -> dict:
    """SGD steps on ``shard(batch)``; the merged weights and the statistics, by layer name."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(STEPS):
        forward(shard(batch(step))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = merged_weights(model, "merge_bi")
    return {"merged": {name: weights[layer] for name, layer in model.named_reslora_layers().items()},
            "statistics": {n: b.clone() for n, b in model.named_buffers() if n.endswith(("_norms", "stat_count"))}}


def ddp_rank(rank: int, variant: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = TOY.wrap(variant, window=WINDOW)
        torch.save(train(model, DistributedDataParallel(model), lambda x: x[rank::WORLD]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch: about a minute on a 2-core machine
@pytest.mark.parametrize("variant", ["is", "ms"])
def test_ddp_ranks_merge_into_the_same_weights_as_one_process_on_the_whole_batch(tmp_path, variant):
    mp.spawn(ddp_rank, args=(variant, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = TOY.wrap(variant, window=WINDOW)
    single = train(model, model, lambda x: x)
    assert ranks[0]["statistics"] and ranks[0]["statistics"].keys() == single["statistics"].keys()
    for name, weight in single["merged"].items():
        assert torch.equal(ranks[0]["merged"][name], ranks[1]["merged"][name]), name
        torch.testing.assert_close(ranks[0]["merged"][name], weight, rtol=1e-5, atol=1e-8)
    for name, statistic in single["statistics"].items():
        assert torch.equal(ranks[0]["statistics"][name], ranks[1]["statistics"][name]), name
        torch.testing.assert_close(ranks[0]["statistics"][name], statistic, rtol=1e-6, atol=0)
