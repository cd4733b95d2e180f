"""The forward and backward of every variant against the method.md equations, written out by hand on a toy
stack of linears (float64): h_n = W_n x_n + b_n + s * branch_n, x_{n+1} = tanh(h_n)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _models import VARIANTS, ToySpec, chains_of, expected_chains, randomize
from reslora import ResLoraConfig, get_reslora_model

UNIFORM = (6, 6, 6, 6, 6)  # 4 blocks, one chain
WIDTHS = (6, 6, 6, 4, 4, 4)  # 5 blocks; proj shapes (6,6) (6,6) (4,6) (4,4) (4,4): chains [0,1] [2] [3,4]


class FixedMask(nn.Module):
    """A deterministic stand-in for the LoRA dropout: multiplies by a fixed mask and counts its calls, so a
    test can tell block n's d(.) from block n-k's."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.mask


def previous_blocks(dims) -> list[list[int]]:
    """For each block, the indices of all earlier blocks of its chain, nearest first (from shapes only)."""
    shapes = [(b, a) for a, b in zip(dims[:-1], dims[1:])]
    chains = expected_chains([(str(i), s) for i, s in enumerate(shapes)], group=lambda name: "proj")
    prev = {}
    for chain in chains:
        idx = [int(n) for n in chain]
        for pos, i in enumerate(idx):
            prev[i] = idx[:pos][::-1]
    return [prev[i] for i in range(len(shapes))]


def reference(x, W, b, A, B, prev, variant, m, s, masks=None, detach=False):
    """h_N of the toy computed from the method.md table; ``detach`` cuts the residual terms (for checking
    that the gradient test can tell the difference)."""
    cut = (lambda t: t.detach()) if detach else (lambda t: t)
    xs, axs = [], []
    h = x
    for n in range(len(W)):
        xn = h
        d = (lambda t, n=n: t * masks[n]) if masks is not None else (lambda t: t)
        used = prev[n] if m < 0 else prev[n][:m]
        base = xn @ W[n].T + b[n]
        if variant == "lora":
            branch = d(xn) @ A[n].T @ B[n].T
        elif variant == "is":
            x_prev = cut(xs[prev[n][0]]) if prev[n] else xn  # first block of a chain: x_{n-1} := x_n
            branch = d(xn + x_prev) @ A[n].T @ B[n].T
        elif variant == "bs":
            M = B[n] @ A[n]
            for k in used:
                M = M + cut(B[k]) @ cut(A[k])
            branch = d(xn) @ M.T
        else:  # ms
            ax = d(xn) @ A[n].T
            total = ax
            for k in used:
                total = total + cut(axs[k])
            branch = total @ B[n].T
        xs.append(xn)
        axs.append(d(xn) @ A[n].T if variant == "ms" else None)
        h = torch.tanh(base + s * branch)
    return h


def build(variant, pre_num, dims, with_masks=False, seed=0):
    spec = ToySpec(dims)
    model = get_reslora_model(spec.build(), ResLoraConfig(variant=variant, r=2, lora_alpha=3.0, pre_num=pre_num,
                                                          target_modules=["proj"]))
    randomize(model, seed=seed, b_scale=0.5, a_scale=0.5)
    layers = [model.base_model.blocks[i].proj for i in range(len(dims) - 1)]
    masks = None
    if with_masks:
        g = torch.Generator().manual_seed(7 + seed)
        masks = []
        for layer in layers:
            mask = (torch.rand(3, layer.in_features, generator=g) > 0.4).to(torch.float64) / 0.6
            layer.lora_dropout = FixedMask(mask)
            masks.append(mask)
    return spec, model, layers, masks


def weights(layers, requires_grad=False):
    W = [layer.base_layer.weight.detach() for layer in layers]
    b = [layer.base_layer.bias.detach() for layer in layers]
    A = [layer.lora_A.detach().clone().requires_grad_(requires_grad) for layer in layers]
    B = [layer.lora_B.detach().clone().requires_grad_(requires_grad) for layer in layers]
    return W, b, A, B


CASES = [(v, p) for v in VARIANTS for p in (0, 1, 2, -1)]


def test_library_wires_the_chains_the_tests_expect():
    _, model, layers, _ = build("bs", -1, WIDTHS)
    assert chains_of(model) == [
        ["blocks.0.proj", "blocks.1.proj"], ["blocks.2.proj"], ["blocks.3.proj", "blocks.4.proj"]]
    expected = previous_blocks(WIDTHS)
    assert expected == [[], [0], [], [], [3]]
    for layer, prev in zip(layers, expected):
        assert [id(p) for p in layer.prev] == [id(layers[k]) for k in prev]


@pytest.mark.parametrize("variant,pre_num", CASES)
def test_prev_wiring(variant, pre_num):
    _, model, layers, _ = build(variant, pre_num, UNIFORM)
    for pos, layer in enumerate(layers):
        everything = [layers[k] for k in range(pos - 1, -1, -1)]  # nearest first
        if variant == "lora":
            want = []
        elif variant == "is":
            want = everything[:1]
        elif pre_num == -1:
            want = everything
        else:
            want = everything[:pre_num]
        assert [id(p) for p in layer.prev] == [id(p) for p in want], (variant, pre_num, pos)


@pytest.mark.parametrize("with_masks", [False, True], ids=["dropout0", "fixedmask"])
@pytest.mark.parametrize("dims", [UNIFORM, WIDTHS], ids=["onechain", "widthchange"])
@pytest.mark.parametrize("variant,pre_num", CASES)
def test_forward_equals_equations(variant, pre_num, dims, with_masks):
    spec, model, layers, masks = build(variant, pre_num, dims, with_masks)
    x = spec.inputs()["x"]
    got = model(x)
    W, b, A, B = weights(layers)
    want = reference(x, W, b, A, B, previous_blocks(dims), variant, pre_num, layers[0].scaling, masks)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the base model alone differs: the adapters do something
    base = spec.build()
    assert (base(x) - got).abs().max() > 1e-3
    if masks is not None:
        # each block applies its own d(.) exactly once per forward (ms reuses A_{n-k} d(x_{n-k}))
        assert [layer.lora_dropout.calls for layer in layers] == [1] * len(layers)


@pytest.mark.parametrize("with_masks", [False, True], ids=["dropout0", "fixedmask"])
@pytest.mark.parametrize("dims", [UNIFORM, WIDTHS], ids=["onechain", "widthchange"])
@pytest.mark.parametrize("variant,pre_num", CASES)
def test_gradients_equal_equations(variant, pre_num, dims, with_masks):
    spec, model, layers, masks = build(variant, pre_num, dims, with_masks, seed=1)
    model.train()
    x = spec.inputs(1)["x"]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, dims[-1], generator=g, dtype=torch.float64)
    (model(x) * w).sum().backward()
    got = [layer.lora_A.grad for layer in layers] + [layer.lora_B.grad for layer in layers]

    W, b, A, B = weights(layers, requires_grad=True)
    prev = previous_blocks(dims)
    s = layers[0].scaling
    (reference(x, W, b, A, B, prev, variant, pre_num, s, masks) * w).sum().backward()
    want = [a.grad for a in A] + [bb.grad for bb in B]
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, atol=1e-10, rtol=1e-8)
    # base weights stay frozen
    assert all(layer.base_layer.weight.grad is None for layer in layers)

    # the residual path carries gradient: cutting it changes the gradients of earlier blocks
    uses_residual = variant in ("is",) or (variant in ("bs", "ms") and pre_num != 0)
    if uses_residual:
        W, b, A2, B2 = weights(layers, requires_grad=True)
        (reference(x, W, b, A2, B2, prev, variant, pre_num, s, masks, detach=True) * w).sum().backward()
        cut = [a.grad for a in A2] + [bb.grad for bb in B2]
        assert max((c - gg).abs().max().item() for c, gg in zip(cut, got)) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_B_is_the_base_model(variant):
    spec = ToySpec(WIDTHS)
    model = get_reslora_model(spec.build(), ResLoraConfig(variant=variant, r=2, pre_num=-1, target_modules=["proj"]))
    x = spec.inputs()["x"]
    torch.testing.assert_close(model(x), spec.build()(x), atol=0, rtol=0)
    # A is Kaiming-uniform (non-zero), B zeros: as in LoRA
    for layer in model.named_reslora_layers().values():
        assert layer.lora_A.abs().max() > 0 and torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / layer.in_features ** 0.5  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        assert layer.lora_A.abs().max() <= bound + 1e-12


def test_is_ignores_pre_num():
    spec = ToySpec(UNIFORM)
    x = spec.inputs()["x"]
    outs = []
    for pre_num in (0, 1, 3, -1):
        _, model, layers, _ = build("is", pre_num, UNIFORM)
        assert [len(layer.prev) for layer in layers] == [0, 1, 1, 1]
        outs.append(model(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_layer_called_outside_the_model_forward_raises(variant):
    _, model, layers, _ = build(variant, 1, UNIFORM)
    with pytest.raises(RuntimeError, match="outside a forward"):
        layers[1](torch.zeros(3, 6, dtype=torch.float64))
