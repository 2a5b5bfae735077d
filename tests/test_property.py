"""Property-based tests over randomly composed float64 graphs of supported ops.

With conservative rules (ε = 1e-12 for linear ops and sums, AttnLRP's uniform rule for products, identity
for element-wise activations, routing for views/cat/split) and bias-free layers, the input relevance of each
row must add up to that row's seed, and the rows of a batch must not influence one another.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamiclrp
from dynamiclrp.rules import Epsilon, Uniform

D = torch.float64
EXACT = {"linear": Epsilon(1e-12), "sum": Epsilon(1e-12), "product": Uniform(1e-12)}

OPS = st.one_of(
    st.tuples(st.just("linear"), st.sampled_from([2, 4, 6])),
    st.tuples(st.just("relu")),
    st.tuples(st.just("tanh")),
    st.tuples(st.just("residual"), st.booleans()),  # h + f(h), f linear (then tanh)
    st.tuples(st.just("sub")),  # h - f(h)
    st.tuples(st.just("mulc"), st.sampled_from([-2.0, 0.5, 3.0])),  # by a Python scalar
    st.tuples(st.just("mult")),  # by a constant tensor outside the graph
    st.tuples(st.just("product"), st.booleans()),  # f(h) * g(h), or h * tanh(h)
    st.tuples(st.just("catsplit"), st.booleans()),  # cat [h, f(h)], split, recombine
    st.tuples(st.just("reduce"), st.sampled_from(["sum", "mean"])),  # over a dim inside the row
    st.tuples(st.just("transpose")),  # reshape, transpose, reshape back
    st.tuples(st.just("matmul")),  # product of two activations: a @ aᵀ
)

PROGRAMS = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "batch": st.integers(2, 3),
    "width": st.sampled_from([2, 4, 6]),
    "ops": st.lists(OPS, min_size=2, max_size=8),
    "second": st.one_of(st.none(), st.integers(0, 6)),  # a second output head on an intermediate state
    "classes": st.integers(2, 4),
    "targets": st.lists(st.integers(0, 3), min_size=6, max_size=6),
})


def build(spec):
    """Run the random program forward; return the input, the outputs and one target per output."""
    g = torch.Generator().manual_seed(spec["seed"])

    def weight(n_out, n_in):
        return nn.Parameter(torch.randn(n_out, n_in, generator=g, dtype=D) / math.sqrt(n_in))

    def lin(h, n_out=None):
        return F.linear(h, weight(n_out or h.shape[1], h.shape[1]))

    B = spec["batch"]
    x = torch.randn(B, spec["width"], generator=g, dtype=D, requires_grad=True)
    h, states = x, []
    for op in spec["ops"]:
        name = op[0]
        if name in ("reduce", "transpose", "matmul") and h.shape[1] % 2:
            h = lin(h, 4)
        width = h.shape[1]
        if name == "linear":
            h = lin(h, op[1])
        elif name == "relu":
            h = torch.relu(h)
        elif name == "tanh":
            h = torch.tanh(h)
        elif name == "residual":
            f = lin(h)
            h = h + (torch.tanh(f) if op[1] else f)
        elif name == "sub":
            h = h - lin(h)
        elif name == "mulc":
            h = h * op[1]
        elif name == "mult":
            h = h * (torch.rand(width, generator=g, dtype=D) + 0.5)
        elif name == "product":
            h = lin(h) * lin(h) if op[1] else h * torch.tanh(h)
        elif name == "catsplit":
            c = torch.cat([h, lin(h)], dim=1)
            if op[1]:
                a, b = c.split(width, dim=1)
                h = a + b
            else:
                parts = c.split([1, 2 * width - 1], dim=1)
                h = lin(torch.cat([parts[1], parts[0]], dim=1), width)
        elif name == "reduce":
            r = h.reshape(B, width // 2, 2)
            h = r.sum(2) if op[1] == "sum" else r.mean(2)
        elif name == "transpose":
            h = h.reshape(B, 2, width // 2).transpose(1, 2).reshape(B, width)
        elif name == "matmul":
            a = h.reshape(B, 2, width // 2)
            h = (a @ a.transpose(1, 2)).reshape(B, 4)
        states.append(h)
    outs = [lin(h, spec["classes"])]
    if spec["second"] is not None:
        outs.append(lin(states[spec["second"] % len(states)], 3))
    targets = []
    for k, o in enumerate(outs):
        targets.append([spec["targets"][3 * k + b] % o.shape[1] for b in range(B)])
    return x, outs, targets


def seed_rows(att):
    return sum(s.sum(1) for s in att.outputs)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(PROGRAMS)
def test_random_graphs_conserve_and_rows_are_independent(spec):
    x, outs, targets = build(spec)
    target = targets[0] if len(outs) == 1 else tuple(targets)
    att = dynamiclrp.propagate(outs if len(outs) > 1 else outs[0], target=target, wrt=[x], rules=EXACT,
                               keep_run=True)
    r = att.inputs[0]
    assert r.shape == x.shape and r.dtype == D
    assert torch.isfinite(r).all()
    assert len(att.outputs) == len(outs)
    for o, s, t in zip(outs, att.outputs, targets):  # the seed is the output value at the target
        assert torch.equal(s.sum(1), o.detach()[torch.arange(len(t)), t])
    # conservation, row by row
    for got, want in zip(r.sum(1).tolist(), seed_rows(att).tolist()):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-10)
    # the ledger agrees: nothing went to parameters, next to nothing was absorbed
    c = att.conservation()
    assert c["parameters"] == 0.0
    assert c["seed"] == pytest.approx(c["inputs"] + c["absorbed"], rel=1e-9, abs=1e-12)
    # each node's rule ran at most once
    assert att.stats.rules_run <= sum(1 for n in att.extra["run"].graph.nodes if n.inputs)

    # batch rows are independent: change only row 1's targets, on the same graph
    other = [[t[0], (t[1] + 1) % o.shape[1], *t[2:]] for t, o in zip(targets, outs)]
    target2 = other[0] if len(outs) == 1 else tuple(other)
    att2 = dynamiclrp.propagate(outs if len(outs) > 1 else outs[0], target=target2, wrt=[x], rules=EXACT)
    r2 = att2.inputs[0]
    torch.testing.assert_close(r2[0], r[0], rtol=1e-12, atol=1e-12)
    if x.shape[0] > 2:
        torch.testing.assert_close(r2[2], r[2], rtol=1e-12, atol=1e-12)
    for got, want in zip(r2.sum(1).tolist(), seed_rows(att2).tolist()):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-10)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(PROGRAMS)
def test_random_graphs_relevance_is_linear_in_the_seed(spec):
    """For fixed activations every rule used here is linear in the seed: R(2·s1 + s2) = 2·R(s1) + R(s2)."""
    x, outs, _ = build(spec)
    y = outs[0]
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    s1, s2 = torch.randn(y.shape, generator=g, dtype=D), torch.randn(y.shape, generator=g, dtype=D)
    s1 = s1 * y.detach()  # proportional to the output: a zero output (e.g. all-ReLU-off row) gets no seed

    def rel(s):
        return dynamiclrp.propagate(y, target=s, wrt=[x], rules=EXACT).inputs[0]

    r1, r2, r12 = rel(s1), rel(s2), rel(2.0 * s1 + s2)
    scale = max(float(r1.abs().max()), float(r2.abs().max()), 1.0)
    torch.testing.assert_close(r12, 2.0 * r1 + r2, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(r1.sum(1), s1.sum(1), rtol=1e-6, atol=1e-9 * scale)
