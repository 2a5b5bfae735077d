"""Execution plans (issue #8): a skeleton reused only for an identical graph, transformed weights only while their
sources are unchanged; results always bitwise equal to an explanation without a plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp import rules as r
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


def test_a_plan_reads_each_batch_norms_sign_once(monkeypatch):
    """z⁺ takes a merged batch norm as an output scale only where every scale is positive: a host read, one for all
    the graph's batch norms together. A plan keeps the answer with the batch norm's constants, so the repeated
    explanations read it no more."""
    tolist, lists = torch.Tensor.tolist, [0]

    def spy(self, *a, **k):
        lists[0] += 1
        return tolist(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
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
        lists[0] = 0
        with HostReads() as counter:
            outs.append(dynamiclrp.explain(m, x, preset="epsilon_plus", target=0, plan=plan).inputs[0])
        reads.append(counter.n + lists[0])
    assert reads[0] - reads[1] == 1 and reads[1] == reads[2]
    assert torch.equal(outs[0], outs[2])


def test_a_leaf_that_changes_kind_is_read_again():
    """The fingerprint does not say whether a leaf is a parameter or data: ``a * x`` with ``a`` a parameter is a
    linear op (all relevance to ``x``), with ``a`` data a product of two activations. A reused skeleton must not
    keep the first call's data flags."""
    plan = dynamiclrp.Plan()
    x = torch.randn(4, dtype=D, requires_grad=True)
    shares = []  # the part of the seed that reaches x
    for a in (nn.Parameter(torch.rand(4, dtype=D) + 0.5), torch.rand(4, dtype=D).add_(0.5).requires_grad_(),
              nn.Parameter(torch.rand(4, dtype=D) + 0.5)):
        att = dynamiclrp.propagate((a * x).sum()[None], target=0, wrt=[x], plan=plan, ledger=False)
        ref = dynamiclrp.propagate((a * x).sum()[None], target=0, wrt=[x], ledger=False)
        assert _same(att, ref)
        shares.append(float(att.inputs[0].sum() / att.outputs[0].sum()))
    assert plan.stats.graphs_built == 1 and plan.stats.graphs_reused == 2
    # linear in x: all of it (ε-rule, ε = 1e-6); a product of two activations: x's share only
    assert shares[0] == pytest.approx(1, abs=1e-4) and shares[2] == pytest.approx(1, abs=1e-4)
    assert shares[1] != pytest.approx(1, abs=0.1)


# ------------------------------------------------------------------------------ the gradient form's working-out
def _rolled(inputs: dict) -> dict:
    """The same shapes, other tokens: each row's ids shifted by one place."""
    return {k: v.roll(1, dims=-1) if "input_ids" in k else v for k, v in inputs.items()}


def _count_planning(monkeypatch) -> dict:
    """Counts of the gradient form's working-out: its steps and its bypasses."""
    from dynamiclrp import api, gradient_form

    calls = {"steps": 0, "bypasses": 0}
    for mod, name, key in ((gradient_form, "gradient_steps", "steps"), (gradient_form, "plan_bypasses", "bypasses")):
        orig = getattr(mod, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    assert api.prepare_gradient_form is gradient_form.prepare_gradient_form
    return calls


def _text_archs():
    from arch_text import ARCHITECTURES

    return ARCHITECTURES


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp", "epsilon"])
@pytest.mark.parametrize("name", list(_text_archs()))
def test_a_plan_reuses_the_gradient_forms_steps_and_bypasses(name, preset, monkeypatch):
    """With a plan the gradient form's steps and bypasses are worked out once per graph: the next runs point them
    at their own autograd nodes. Other tokens each time, so a step still reading the first run's node would give
    the first run's answer: every run must equal, bit for bit, an explanation without a plan."""
    from test_coverage_text import to_double

    arch = _text_archs()[name]
    attn = "eager" if "eager" in arch.attn else arch.attn[0]
    model, inputs, out = arch.small(attn)
    old = torch.get_default_dtype()
    if arch.default_double:
        torch.set_default_dtype(D)
    try:
        model, inputs = model.double().eval(), to_double(inputs)
        runs = [inputs, _rolled(inputs), inputs]
        refs = [dynamiclrp.explain(model, i, preset=preset, output=out, ledger=False) for i in runs]
        calls, plan = _count_planning(monkeypatch), dynamiclrp.Plan()
        got = [dynamiclrp.explain(model, i, preset=preset, output=out, ledger=False, plan=plan) for i in runs]
    finally:
        torch.set_default_dtype(old)
    assert not torch.equal(refs[0].tokens, refs[1].tokens)
    for a, b in zip(got, refs):
        assert a.stats.gradient_form == b.stats.gradient_form
        assert a.stats.bypassed_kinds == b.stats.bypassed_kinds
        assert all(torch.equal(a.embeddings[k], b.embeddings[k]) for k in b.embeddings)
    assert plan.stats.graphs_built == 1 and plan.stats.graphs_reused == 2
    if refs[0].stats.gradient_form:
        assert calls == {"steps": 1, "bypasses": 1}


def _fused_cases():
    """Fused attention and fused projections (the text architectures above run eager attention)."""
    from test_gradient_form import PackedAttention, RMSDecoder, tiny, tiny_vit

    def draws(*shape):
        return lambda k: torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(k))

    torch.manual_seed(0)
    cases = {"vit": (tiny_vit(), {}, draws(2, 3, 32, 32)),
             "packed": (PackedAttention().to(D).eval(), {}, draws(2, 5, 8)),
             "rms": (RMSDecoder().to(D).eval(), {}, draws(2, 5, 8))}
    for name in ("llama", "gpt2"):
        model, out = tiny(name, "sdpa")
        cases[f"{name}_sdpa"] = (model, {"output": out}, lambda k: {"input_ids": torch.randint(
            3, 100, (2, 9), generator=torch.Generator().manual_seed(k))})
    return cases


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_a_plan_reuses_the_fused_steps_and_bypasses(preset, monkeypatch):
    """As above, for fused attention (its values' gradient alone under CP-LRP), packed projections (narrowed),
    norms written out and a vision transformer."""
    bypassed = {}
    for name, (model, kw, make) in _fused_cases().items():
        refs = [dynamiclrp.explain(model, make(k), preset=preset, ledger=False, **kw) for k in range(3)]
        with monkeypatch.context() as m:
            calls, plan = _count_planning(m), dynamiclrp.Plan()
            got = [dynamiclrp.explain(model, make(k), preset=preset, ledger=False, plan=plan, **kw) for k in range(3)]
        assert calls == {"steps": 1, "bypasses": 1}, name
        for a, b in zip(got, refs):
            assert a.stats.bypassed_kinds == b.stats.bypassed_kinds, name
            assert all(torch.equal(p, q) for p, q in zip(a.inputs, b.inputs)), name
        bypassed[name] = got[-1].stats.bypassed
    assert all(bypassed.values()) if preset == "cp_lrp" else sum(n > 0 for n in bypassed.values()) >= 3, bypassed


def test_a_plan_reuses_the_stabilised_steps(monkeypatch):
    """The ε-rule's steps (a real stabiliser: the gradient scaled at each layer's output, merged batch norms
    included) are kept by a plan like the others and read the next run's nodes: other inputs each run, every run
    bit for bit the explanation without a plan."""
    from test_gradient_form import EpsilonCNN

    torch.manual_seed(0)
    model = EpsilonCNN().to(D).eval()
    xs = [torch.randn(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    refs = [dynamiclrp.explain(model, x, preset="epsilon", target=[0, 2], ledger=False) for x in xs]
    calls, plan = _count_planning(monkeypatch), dynamiclrp.Plan()
    got = [dynamiclrp.explain(model, x, preset="epsilon", target=[0, 2], ledger=False, plan=plan) for x in xs]
    assert calls["steps"] == 1 and all(a.stats.gradient_form for a in got)
    for a, b in zip(got, refs):
        assert all(torch.equal(p, q) for p, q in zip(a.inputs, b.inputs))
    assert not torch.equal(got[0].inputs[0], got[1].inputs[0])


def _bert(seq: int, batch: int = 1):
    from test_coverage_text import to_double

    arch = _text_archs()["bert"]
    model, inputs, out = arch.build(arch.small_kw, "eager", batch=batch, seq=seq)
    return model.double().eval(), to_double(inputs), out


def _searched_copies(monkeypatch) -> list:
    """The output slots whose saved copy was searched for (not found by a route a plan kept), one list per run."""
    from dynamiclrp.promise import Promises

    runs, search = [], Promises._search_copy

    def counted(self, key, depth=0):
        if depth == 0:
            runs[-1].append(key)
        return search(self, key, depth)
    monkeypatch.setattr(Promises, "_search_copy", counted)
    return runs


@pytest.mark.parametrize("batch", [1, 2])
def test_a_plan_follows_the_saved_copies_it_found(batch, monkeypatch):
    """The first run's searches for saved copies (a projection's output that the attention's product saved behind
    views) are kept with the skeleton, and the next runs take each copy by the route found, without a search:
    other tokens each time, every run bit for bit the explanation without a plan. With two rows the product saved
    the queries, keys and values merged with the heads, a copy, from which undoing the views copies again: those
    are searched every time (no saved tensor shares the memory of what the search gives)."""
    model, inputs, out = _bert(8, batch)
    runs = [inputs, _rolled(inputs), inputs]
    kw = dict(preset="epsilon", output=out, ledger=False)
    refs = [dynamiclrp.explain(model, i, **kw) for i in runs]
    searched, plan = _searched_copies(monkeypatch), dynamiclrp.Plan()
    got = []
    for i in runs:
        searched.append([])
        got.append(dynamiclrp.explain(model, i, plan=plan, **kw))
    for a, b in zip(got, refs):
        assert a.stats.gradient_form and all(torch.equal(a.embeddings[k], b.embeddings[k]) for k in b.embeddings)
    (skeleton,) = plan._skeletons.values()
    routed = {key for key, route in skeleton.copies.items() if isinstance(route, tuple)}
    kinds = [skeleton.nodes[nid][1] for nid, _ in routed]
    assert kinds.count("GeluBackward0") == 2 and len(routed) >= (12 if batch == 1 else 4), kinds
    assert routed <= set(searched[0])
    assert not routed & (set(searched[1]) | set(searched[2]))
    assert not {key for key, route in skeleton.copies.items() if route is None} & set(searched[1])


def test_a_kept_route_is_not_followed_where_the_layout_differs(monkeypatch):
    """Another sequence length is the same graph (one skeleton), but the saved tensors a route reads are laid out
    otherwise: the route is not followed, the copy is searched for again, and the relevance is the explanation's
    without a plan."""
    plan = dynamiclrp.Plan()
    model, short, out = _bert(8)
    _, long, _ = _bert(12)
    kw = dict(preset="epsilon", output=out, ledger=False)
    dynamiclrp.explain(model, short, plan=plan, **kw)
    (skeleton,) = plan._skeletons.values()
    routed = {key for key, route in skeleton.copies.items() if isinstance(route, tuple)}
    searched = _searched_copies(monkeypatch)
    searched.append([])
    got = dynamiclrp.explain(model, long, plan=plan, **kw)
    assert plan.stats.graphs_reused == 1 and routed and routed <= set(searched[0])
    ref = dynamiclrp.explain(model, long, **kw)
    assert all(torch.equal(got.embeddings[k], ref.embeddings[k]) for k in ref.embeddings)


def test_a_plan_keeps_where_a_relu_follows_a_layer():
    """The ε-step's ReLU above a layer (its output the layer's, where positive) is looked for once per skeleton and
    kept; every run bit for bit the explanation without a plan."""
    m, plan = _cnn(), dynamiclrp.Plan()
    for k in range(2):
        x = torch.randn(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(k))
        got = dynamiclrp.explain(m, x, target=[0, 2], preset="epsilon", plan=plan)
        assert _same(got, dynamiclrp.explain(m, x, target=[0, 2], preset="epsilon"))
    (skeleton,) = plan._skeletons.values()
    (relu, views), = [route for route in skeleton.relus.values() if route is not None]  # the second convolution's
    assert skeleton.nodes[relu][1] == "ReluBackward0" and views == ()


def test_other_rules_or_other_recorded_slots_work_the_steps_out_again(monkeypatch):
    """The working-out is kept per rule set and per recorded slot: another preset, another ``rules=`` or more
    recorded activations on the same graph do not get the first's steps."""
    from test_gradient_form import RMSDecoder

    torch.manual_seed(0)
    model, plan = RMSDecoder().to(D).eval(), dynamiclrp.Plan()
    x = torch.randn(2, 5, 8, dtype=D)
    runs = [dict(preset="attnlrp"), dict(preset="cp_lrp"), dict(preset="attnlrp", modules=["mlp.0.1"]),
            dict(preset="attnlrp", rules={"softmax": r.Pass()}), dict(preset="attnlrp"), dict(preset="cp_lrp")]
    refs = [dynamiclrp.explain(model, x, ledger=False, **kw) for kw in runs]
    calls = _count_planning(monkeypatch)
    got = [dynamiclrp.explain(model, x, ledger=False, plan=plan, **kw) for kw in runs]
    for a, b in zip(got, refs):
        assert all(torch.equal(p, q) for p, q in zip(a.inputs, b.inputs))
        assert all(torch.equal(a.modules[k], b.modules[k]) for k in b.modules)
    assert calls["steps"] == 4 and plan.stats.graphs_reused == 5


def test_a_kept_pass_holds_no_run():
    """Between explanations the plan keeps the steps, not the run they last served: no activation, no autograd
    node, no relevance."""
    import weakref

    from test_gradient_form import PackedAttention

    torch.manual_seed(0)
    model, plan = PackedAttention().to(D).eval(), dynamiclrp.Plan()
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    held = []  # the first layer's output: saved by the layer norm's node, so alive exactly while the graph is
    model.inp.register_forward_hook(lambda m, i, o: held.append(weakref.ref(o)))
    y = model(x)
    att = dynamiclrp.propagate(y, target=0, wrt=[x], preset="cp_lrp", ledger=False, plan=plan)
    assert att.stats.gradient_form and att.stats.bypassed and held[0]() is not None
    del y, att
    assert held[0]() is None
    (skeleton,) = plan._skeletons.values()
    (kept,) = skeleton.passes.values()
    assert kept.steps and all(ctx.run is None and ctx.node is None for _, _, ctx in kept.steps)
    assert kept.bypasses is not None and kept.bypasses.graph is None and not kept.bypasses.pending


def test_threads_sharing_a_plan_take_turns():
    """Two threads explaining with one plan: each propagation has the plan to itself (the other waits), and every
    answer is the one without a plan. An explanation started inside another's propagation is refused."""
    import threading

    from test_gradient_form import PackedAttention

    torch.manual_seed(0)
    model, plan = PackedAttention().to(D).eval(), dynamiclrp.Plan()
    xs = [torch.randn(2, 5, 8, dtype=D, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    refs = [dynamiclrp.explain(model, x, preset="cp_lrp", ledger=False).inputs[0] for x in xs]
    got: dict[int, torch.Tensor] = {}

    def work(ks):
        for k in ks:
            got[k] = dynamiclrp.explain(model, xs[k], preset="cp_lrp", ledger=False, plan=plan).inputs[0]

    threads = [threading.Thread(target=work, args=(ks,)) for ks in ((0, 2, 4), (1, 3, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[k], refs[k]) for k in range(6))
    with plan.active(), pytest.raises(dynamiclrp.DynamicLRPError, match="already serving"):
        dynamiclrp.explain(model, xs[0], preset="cp_lrp", ledger=False, plan=plan)


def test_a_plan_keeps_one_transformed_copy_for_the_alpha_beta_rule():
    """On a ReLU's output the αβ-rule takes w⁻ as w − w⁺ where a plan keeps w⁺: bit for bit the clamp (zeros,
    negative weights, ±0 and the extremes), so the plan holds w⁺ alone for that layer, and the relevance is the
    planless one (checked above). The image layer (inputs of both signs) stacks w⁺ and w⁻ into one product, whose
    weight the plan keeps with the w⁻ it came from."""
    w = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, torch.finfo(D).max, -torch.finfo(D).max], dtype=D)
    assert torch.equal(w - w.clamp(min=0), w.clamp(max=0))
    m, plan = _cnn(), dynamiclrp.Plan()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    for _ in range(2):
        dynamiclrp.explain(m, x, target=[0, 2], preset="epsilon_alpha2_beta1", plan=plan)
    kept = {(k[0], k[1][1]) for k in plan._weights}  # (label, shape of the weight it came from)
    second = tuple(m[3].weight.shape)
    assert ("+", second) in kept and ("-", second) not in kept
    assert {label for label, shape in kept if shape != second} >= {"+", "-", "stacked"}


def test_an_op_entry_registered_again_is_not_served_from_the_old_skeleton():
    """A node type whose op entry is replaced (``register_op``) between two explanations: the fingerprint names
    the entry, so the second explanation reads its graph afresh and applies the new rule."""
    from dynamiclrp.ops import OPS
    from test_engine import _Twice

    plan, x = dynamiclrp.Plan(), torch.randn(3, dtype=D, requires_grad=True)
    got = []
    try:
        for share in (1.0, 0.5):
            dynamiclrp.register_op(_Twice, lambda ctx, s=share: [s * ctx.R[0]], forward=lambda t: 2 * t)
            got.append(dynamiclrp.propagate(_Twice.apply(x).sum()[None], target=0, wrt=[x], plan=plan).inputs[0])
    finally:
        OPS.pop("_TwiceBackward", None)
    assert torch.allclose(got[1], 0.5 * got[0]) and got[0].abs().sum() > 0
    assert plan.stats.graphs_built == 2


def test_an_unhashable_rule_keeps_nothing_and_still_explains():
    """A rule that cannot be hashed (a mutable dataclass, say) cannot key a kept pass: the plan then works the
    steps out each time, with the same answer."""
    from test_gradient_form import RMSDecoder

    product = dynamiclrp.presets()["attnlrp"].rule("product")

    class Unhashable(type(product)):
        __hash__ = None  # type: ignore[assignment]

    torch.manual_seed(0)
    model, plan, x = RMSDecoder().to(D).eval(), dynamiclrp.Plan(), torch.randn(2, 5, 8, dtype=D)
    kw = dict(preset="attnlrp", ledger=False, rules={"product": Unhashable(product.eps)})
    ref = dynamiclrp.explain(model, x, **kw)
    for _ in range(2):
        got = dynamiclrp.explain(model, x, plan=plan, **kw)
        assert got.stats.gradient_form and torch.equal(got.inputs[0], ref.inputs[0])
    (skeleton,) = plan._skeletons.values()
    assert not skeleton.passes
