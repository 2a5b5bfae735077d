"""Integrations: Hugging Face helpers, the Quantus explain_func, the Captum-style LRP adapter, model loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamiclrp
from dynamiclrp.integrations import (
    LRP,
    LoadError,
    explain_func,
    explain_generation,
    explain_next_token,
    explain_qa,
    explain_text,
    load_model,
    next_token_target,
    qa_targets,
    read_state_dict,
)
from dynamiclrp.integrations.hf import model_inputs


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()


# ------------------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import hf_tiny

    root = tmp_path_factory.mktemp("hf_int")
    out = {}
    for key, head in (("cls", "classification"), ("qa", "qa")):
        d = hf_tiny.bert_dir(root / key, head)
        auto = (transformers.AutoModelForSequenceClassification if head == "classification"
                else transformers.AutoModelForQuestionAnswering)
        out[key] = (auto.from_pretrained(d).eval(), transformers.AutoTokenizer.from_pretrained(d))
    d = hf_tiny.gpt2_dir(root / "lm")
    out["lm"] = (transformers.AutoModelForCausalLM.from_pretrained(d).eval(),
                 transformers.AutoTokenizer.from_pretrained(d))
    return out


def test_token_relevance_is_aligned_to_the_tokenizer(hf):
    model, tok = hf["cls"]
    texts = ["An unbelievably good film.", "Bad."]
    ex = explain_text(model, tok, texts)
    enc = tok(texts, padding=True, return_tensors="pt")
    assert len(ex.rows) == 2 and ex.logits.shape == (2, 2)
    for i, row in enumerate(ex.rows):
        assert row.ids == enc["input_ids"][i].tolist()
        assert row.tokens == tok.convert_ids_to_tokens(row.ids)
        np.testing.assert_allclose(row.relevance, ex.attribution.tokens[i].double().numpy())
        assert row.special[0] and row.label in ("negative", "positive")
        assert ex.targets[i] == int(ex.logits[i].argmax())
    assert ex.rows[1].special[-1] and not ex.rows[1].attended[-1]  # padding: special, and not rendered
    assert [w.text for w in ex.rows[1].words()] == ["[CLS]", "Bad.", "[SEP]"]
    words = ex.rows[0].words()
    assert [w.text for w in words if not w.special] == ["An", "unbelievably", "good", "film."]
    assert sum(w.relevance for w in words) == pytest.approx(float(ex.rows[0].relevance.sum()), rel=1e-9, abs=1e-12)
    assert "<span" in ex.rows[0].html() and "\x1b[" in ex.rows[0].ansi()
    assert len(ex.rows[0].top(2)) == 2


def test_text_target_and_pairs(hf):
    model, tok = hf["cls"]
    ex = explain_text(model, tok, "first part", text_pair="second part", target=1)
    assert ex.targets == [1] and ex.rows[0].label == "positive"
    words = [w.text for w in ex.rows[0].words() if not w.special]
    assert words == ["first", "part", "second", "part"]


def test_model_inputs_filters_by_signature(hf):
    model, tok = hf["lm"]
    enc = tok(["hello world"], return_tensors="pt", return_offsets_mapping=True)
    kw = model_inputs(model, enc)
    assert "offset_mapping" not in kw and kw["use_cache"] is False and "input_ids" in kw


def test_qa_targets_start_end_and_linearity(hf):
    model, tok = hf["qa"]
    assert qa_targets(2, 4) == (2, 4)
    with pytest.raises(ValueError):
        qa_targets(which="middle")
    enc = tok("Where?", "On the mat.", return_tensors="pt")
    both = dynamiclrp.explain(model, dict(enc), target=qa_targets(3, 5), preset="attnlrp")
    start = dynamiclrp.explain(model, dict(enc), target=qa_targets(3, 5, "start"), preset="attnlrp")
    end = dynamiclrp.explain(model, dict(enc), target=qa_targets(3, 5, "end"), preset="attnlrp")
    assert start.outputs[0][0].nonzero().flatten().tolist() == [3] and not start.outputs[1].any()
    assert end.outputs[1][0].nonzero().flatten().tolist() == [5] and not end.outputs[0].any()
    torch.testing.assert_close(both.tokens, start.tokens + end.tokens, rtol=1e-4, atol=1e-7)
    r = explain_qa(model, tok, "Where is the cat?", "The cat is on the mat.")
    assert {"answer", "start", "end", "start_relevance", "end_relevance"} <= set(r)
    assert len(r["start_relevance"].tokens) == len(r["end_relevance"].tokens)
    assert r["start_relevance"].label.startswith("answer start")


def test_next_token_target_seeds_one_logit():
    out = torch.randn(2, 4, 6)
    s = next_token_target(3)(out)
    assert s.nonzero().tolist() == [[0, 3, 3], [1, 3, 3]]
    assert s[0, 3, 3] == out[0, 3, 3]
    s = next_token_target(None, position=1, seed="one")(out)
    assert s.sum() == 2 and s[:, 1].argmax(-1).tolist() == out[:, 1].argmax(-1).tolist()
    with pytest.raises(ValueError):
        next_token_target(0)(torch.randn(2, 3))


def test_causal_lm_next_token_and_generation(hf):
    model, tok = hf["lm"]
    prompt = "the capital of france is"
    r = explain_next_token(model, tok, prompt)
    with torch.no_grad():
        pred = int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())
    assert f"(id {pred})" in r.label
    assert len(r.tokens) == len(tok(prompt)["input_ids"])
    assert [w.text for w in r.words()] == prompt.split()
    gen = explain_generation(model, tok, "the cat", max_new_tokens=3)
    lens = [len(g.tokens) for g in gen]
    assert lens == [lens[0], lens[0] + 1, lens[0] + 2]
    # the explained relevance is the one explain() gives for the same target
    enc = tok("the cat", return_tensors="pt")
    att = dynamiclrp.explain(model, {**enc, "use_cache": False}, target=next_token_target(), preset="attnlrp")
    np.testing.assert_allclose(gen[0].relevance, att.tokens[0].double().numpy(), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------- Quantus / Captum


def test_explain_func_matches_explain():
    model = small_cnn()
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 2, 1])
    a = explain_func(model, x, y, preset="epsilon_plus")
    assert isinstance(a, np.ndarray) and a.shape == x.shape and a.dtype == np.float32
    ref = dynamiclrp.explain(model, torch.from_numpy(x), target=torch.from_numpy(y), preset="epsilon_plus")
    np.testing.assert_allclose(a, ref.inputs[0].numpy(), rtol=1e-6, atol=1e-8)
    red = explain_func(model, x, y, preset="epsilon_plus", reduce_axes=(1,), method="LRP", softmax=False)
    assert red.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(red[:, 0], a.sum(1), rtol=1e-5, atol=1e-7)
    assert explain_func(model, x, 1).shape == x.shape  # one target for all rows


def test_quantus_metrics_run_on_our_attributions():
    quantus = pytest.importorskip("quantus")
    model = small_cnn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    kwargs = {"preset": "epsilon_gamma_box"}
    sparse = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
        explain_func_kwargs=kwargs, device="cpu")
    assert len(sparse) == 4 and all(np.isfinite(sparse)) and all(0 <= s <= 1 for s in sparse)
    faith = quantus.FaithfulnessCorrelation(nr_runs=5, subset_size=8, perturb_baseline="black",
                                            disable_warnings=True, display_progressbar=False,
                                            return_aggregate=False)(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
        explain_func_kwargs=kwargs, device="cpu")
    assert len(faith) == 4 and all(np.isfinite(faith))


def test_captum_style_lrp_equals_explain():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    lrp = LRP(model, preset="epsilon_plus")
    attr, delta = lrp.attribute(x, target=[1, 2], return_convergence_delta=True)
    ref = dynamiclrp.explain(model, x, target=[1, 2], preset="epsilon_plus")
    torch.testing.assert_close(attr, ref.inputs[0], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(delta, logits[[0, 1], [1, 2]] - attr.sum((1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert lrp.has_convergence_delta() and lrp.multiplies_by_inputs and lrp.last_attribution is not None
    assert not x.requires_grad and all(p.requires_grad for p in model.parameters())  # model left as it was


def test_captum_style_lrp_shares_a_plan_across_calls():
    """A plan given to the adapter serves every ``attribute`` call of a loop: the graph is read and the pass worked
    out once, the transformed weights computed once, and each call's answer equals :func:`dynamiclrp.explain`'s
    without a plan."""
    model = small_cnn()
    plan = dynamiclrp.Plan()
    lrp = LRP(model, preset="epsilon_gamma_box", plan=plan)
    computed = []
    for k in range(3):
        x = torch.randn(2, 3, 8, 8)
        attr = lrp.attribute(x, target=[k, 2 - k])
        computed.append(plan.stats.weights_computed)
        ref = dynamiclrp.explain(model, x, target=[k, 2 - k], preset="epsilon_gamma_box")
        torch.testing.assert_close(attr, ref.inputs[0], rtol=1e-6, atol=1e-8)
    assert (plan.stats.graphs_built, plan.stats.graphs_reused) == (1, 2)
    assert computed[0] > 0 and computed == [computed[0]] * 3 and plan.stats.weights_reused == 2 * computed[0]


def test_captum_style_lrp_tuples_and_additional_args():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)

        def forward(self, x, z, scale):
            return (self.a(x) + self.b(z)) * scale

    torch.manual_seed(0)
    m = Two()
    x, z = torch.randn(2, 4), torch.randn(2, 5)
    rx, rz = LRP(m).attribute((x, z), target=0, additional_forward_args=torch.tensor(2.0))
    assert rx.shape == x.shape and rz.shape == z.shape
    ref = dynamiclrp.explain(LRPBound(m, 2.0), (x, z), target=0)
    torch.testing.assert_close(rx, ref.inputs[0])
    torch.testing.assert_close(rz, ref.inputs[1])


class LRPBound(torch.nn.Module):
    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, z):
        return self.m(x, z, torch.tensor(self.s))


# ---------------------------------------------------------------------------------------------------- loading


def test_load_model_sources(tmp_path):
    pytest.importorskip("torchvision")
    m = load_model("torchvision:resnet18")
    assert not m.training
    f = tmp_path / "net.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 3)\n")
    lin = load_model(f"{f}:build")
    assert isinstance(lin, torch.nn.Linear)
    for bad in ("torchvision:nope", "timm:nope", "nope", f"{tmp_path / 'x.py'}:build", f"{f}:missing"):
        with pytest.raises(LoadError):
            load_model(bad)


def test_timm_source():
    pytest.importorskip("timm")
    m = load_model("timm:resnet18")
    att = dynamiclrp.explain(m, torch.randn(1, 3, 32, 32), preset="epsilon_plus")
    assert att.inputs[0].shape == (1, 3, 32, 32)


def test_state_dicts_safetensors_and_prefixes(tmp_path):
    lin = torch.nn.Linear(2, 3)
    sd = lin.state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pt")
    got = read_state_dict(tmp_path / "dp.pt")
    assert set(got) == set(sd)
    st = pytest.importorskip("safetensors.torch")
    st.save_file(sd, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["weight"], sd["weight"])
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadError):
        read_state_dict(tmp_path / "broken.safetensors")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(LoadError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "created-by-unpickling"
    torch.save({"weight": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(LoadError, match="refusing"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.compare
def test_captum_style_lrp_equals_captum_lrp():
    captum_attr = pytest.importorskip("captum.attr")
    from dynamiclrp.rules import Epsilon

    class Net(torch.nn.Module):  # Captum needs out-of-place ReLUs and has no rule for nn.Flatten
        def __init__(self):
            super().__init__()
            self.c1, self.r1 = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU()
            self.c2, self.r2 = torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU()
            self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.pool(self.r2(self.c2(self.r1(self.c1(x))))).flatten(1))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = captum_attr.LRP(model).attribute(x.clone().requires_grad_(), target=[1, 3]).detach()
    ours = LRP(model, preset="epsilon", rules={"linear": Epsilon(1e-9), "sum": Epsilon(1e-9)})
    torch.testing.assert_close(ours.attribute(x, target=[1, 3]), expected, rtol=1e-7, atol=1e-10)
