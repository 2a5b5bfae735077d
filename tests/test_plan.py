"""Execution plans (issue #8): a skeleton reused only for an identical graph, transformed weights only while their
sources are unchanged; results always bitwise equal to an explanation without a plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from host_reads import HostReads

D = torch.float64


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(0.5, 2), m[1].weight.uniform_(0.5, 2)
    return m


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.inputs, b.inputs))


@pytest.mark.parametrize("preset", ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1",
                                    "epsilon_plus_flat"])
def test_reused_plan_gives_the_same_relevance(preset):
    m, plan = _cnn(), dynamiclrp.Plan()
    for k in range(3):
        x = torch.randn(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(k))
        with_plan = dynamiclrp.explain(m, x, target=[0, 2], preset=preset, plan=plan)
        assert _same(with_plan, dynamiclrp.explain(m, x, target=[0, 2], preset=preset))
    assert plan.stats.graphs_built == 1 and plan.stats.graphs_reused == 2
    if preset != "epsilon":  # ε transforms no weight; the others clamp or merge the batch norm
        assert plan.stats.weights_reused > 0 and plan.cached_bytes > 0


def test_a_different_graph_builds_its_own_skeleton():
    """Same op types, different wiring: the fingerprint differs, so nothing is reused."""
    plan = dynamiclrp.Plan()
    a = torch.randn(3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    for wire in (lambda: a * b + a, lambda: a * b + b, lambda: a * b + a):
        y = wire().sum()[None]
        att = dynamiclrp.propagate(y, target=0, wrt=[a, b], plan=plan)
        ref = dynamiclrp.propagate(wire().sum()[None], target=0, wrt=[a, b])
        assert _same(att, ref)
    assert plan.stats.graphs_built == 2 and plan.stats.graphs_reused == 1


@pytest.mark.parametrize("change", ["weight in place", "optimizer step", "load_state_dict", "batch-norm variance",
                                    "batch-norm mean", "batch-norm bias", "new parameter"])
def test_changed_weights_are_not_served_from_the_cache(change):
    """Each change would give a stale (wrong) relevance if the cache missed it: the result must equal a fresh
    explanation with the new weights."""
    m, plan = _cnn(), dynamiclrp.Plan()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    before = dynamiclrp.explain(m, x, preset="epsilon_plus", plan=plan)
    if change == "weight in place":
        with torch.no_grad():
            m[3].weight.mul_(-1.5)
    elif change == "optimizer step":
        m(x).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    elif change == "load_state_dict":
        other = _cnn()
        with torch.no_grad():
            for p in other.parameters():
                p.uniform_(-1, 1)
        m.load_state_dict(other.state_dict())
    elif change == "batch-norm variance":
        with torch.no_grad():
            m[1].running_var.mul_(4)
    elif change == "batch-norm mean":  # the merged constants (scale, shift) are kept too
        with torch.no_grad():
            m[1].running_mean.add_(0.5)
    elif change == "batch-norm bias":
        with torch.no_grad():
            m[1].bias.add_(1.0)
    else:
        m[3].weight = nn.Parameter(torch.randn_like(m[3].weight))
    after = dynamiclrp.explain(m, x, preset="epsilon_plus", plan=plan)
    fresh = dynamiclrp.explain(m, x, preset="epsilon_plus")
    assert _same(after, fresh)
    assert not _same(after, before)  # the change matters: a stale cache would have been caught


def test_weights_not_used_by_the_latest_explanation_are_dropped():
    plan = dynamiclrp.Plan()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    dynamiclrp.explain(_cnn(), x, preset="epsilon_plus", plan=plan)
    one_model = plan.cached_bytes
    m2 = _cnn()
    dynamiclrp.explain(m2, x, preset="epsilon_plus", plan=plan)
    dynamiclrp.explain(m2, x, preset="epsilon_plus", plan=plan)
    assert 0 < plan.cached_bytes <= one_model  # the first model's weights are gone


def test_activations_are_never_cached():
    """Parameter relevance runs the same rules with the roles swapped (the activation in the weight's place): what
    they derive from the activation must not be kept. Every kept tensor comes from the model's parameters, and
    asking for parameter relevance keeps nothing more; both would fail if the swapped call cached."""
    m, x = _cnn(), torch.randn(1, 3, 8, 8, dtype=D)
    counts = []
    for params in ((), ("3.weight", "7.weight")):
        plan = dynamiclrp.Plan()
        att = dynamiclrp.explain(m, x, preset="epsilon_plus", params=list(params), plan=plan)
        assert params == () or all(att.params[p] is not None for p in params)
        counts.append(plan.stats.weights_computed)
        # a kept tensor is derived from parameters and buffers (a batch norm's running statistics), or from another
        # kept tensor (w+ of a merged weight)
        kept = [t for _, v in plan._weights.values() for t in (v if isinstance(v, tuple) else (v,))
                if isinstance(t, torch.Tensor)]
        owners = {t.data_ptr() for t in [*m.parameters(), *m.buffers(), *kept]}
        for key, (sources, _) in plan._weights.items():
            assert all(t.data_ptr() in owners for t in sources), key
    assert counts[0] == counts[1] > 0


def test_fused_nodes_hit_the_plan():
    """Fused nodes split into parts (SDPA, addcmul, addmm, convolution with bias) name the same op entries each time,
    so an identical graph is recognised (a fingerprint that changed per call would rebuild every time)."""
    torch.manual_seed(1)
    proj = nn.Linear(8, 24).double()
    plan = dynamiclrp.Plan()
    for k, n in enumerate((5, 7, 5)):  # another sequence length is the same graph: the skeleton serves it too
        x = torch.randn(2, n, 8, dtype=D, generator=torch.Generator().manual_seed(k), requires_grad=True)
        q, kk, v = proj(x).view(2, n, 3, 8).unbind(2)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        y = torch.nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=mask)
        y = torch.addcmul(y, y, y, value=0.5).sum((1, 2))[:, None]
        att = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp", plan=plan)
        ref = dynamiclrp.propagate(y, target=0, wrt=[x], preset="attnlrp")
        assert _same(att, ref)
    assert plan.stats.graphs_built == 1 and plan.stats.graphs_reused == 2


def test_a_plan_reads_each_batch_norms_sign_once():
    """z⁺ takes a merged batch norm as an output scale only where every scale is positive: a host read per batch
    norm. A plan keeps the answer with the batch norm's constants, so the repeated explanations read it no more."""
    torch.manual_seed(0)
    layers = []
    for cin, cout in ((3, 4), (4, 5), (5, 6)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    m = nn.Sequential(*layers, nn.Flatten(), nn.Linear(6 * 36, 3)).eval()
    for bn in (layer for layer in m if isinstance(layer, nn.BatchNorm2d)):
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.normal_()
        bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    plan, reads, outs = dynamiclrp.Plan(), [], []
    for _ in range(3):
        with HostReads() as counter:
            outs.append(dynamiclrp.explain(m, x, preset="epsilon_plus", target=0, plan=plan).inputs[0])
        reads.append(counter.n)
    assert reads[0] - reads[1] == 3 and reads[1] == reads[2]
    assert torch.equal(outs[0], outs[2])
