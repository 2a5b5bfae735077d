"""dynamiclrp.evaluate: metrics on hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch

from dynamiclrp import evaluate as ev


class Contrib(torch.nn.Module):
    """Logits (f, -f) with f = Σ w·x: a linear model whose contributions are known."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.flatten())

    def forward(self, x):
        f = (x.flatten(1) @ self.w[:, None])[:, 0]  # mm: dynamiclrp has no rule for MvBackward0 (x @ vector)
        return torch.stack([f, -f], -1)


def test_abpc_of_perfect_ranking_on_linear_model_is_analytic():
    # contributions 4, 3, 2, 1 (x = 1, baseline 0), one pixel per step, 4 steps.
    # MoRF logits: 10, 6, 3, 1, 0 -> AUC = 1/4 (8 + 4.5 + 2 + 0.5) = 3.75
    # LeRF logits: 10, 9, 7, 4, 0 -> AUC = 1/4 (9.5 + 8 + 5.5 + 2) = 6.25 ; ABPC = 2.5
    w = torch.tensor([[[[2.0, 4.0], [1.0, 3.0]]]])
    model = Contrib(w)
    x = torch.ones(1, 1, 2, 2)
    c = ev.perturbation_curves(model, x, x * w, torch.tensor([0]), steps=4, replace="zero", score="logit")
    assert torch.allclose(c["morf"][0], torch.tensor([10.0, 6, 3, 1, 0]))
    assert torch.allclose(c["lerf"][0], torch.tensor([10.0, 9, 7, 4, 0]))
    res = ev.PerturbationResult(c["morf"], c["lerf"], torch.linspace(0, 1, 5, dtype=torch.float64), "logit")
    s = res.summary()
    assert s["auc_morf"] == pytest.approx(3.75)
    assert s["auc_lerf"] == pytest.approx(6.25)
    assert s["abpc"] == pytest.approx(2.5)
    assert s["comprehensiveness"] == pytest.approx(10 - 3.75)
    assert s["sufficiency"] == pytest.approx(10 - 6.25)
    assert ev.PerturbationResult(c["morf"], c["lerf"], res.fractions).summary(scale=4)["abpc"] == pytest.approx(10)
    # the reversed ranking flips the sign, a constant map (reading order 2,4,1,3) sits in between
    rev = ev.perturbation_curves(model, x, -x * w, torch.tensor([0]), steps=4, replace="zero", score="logit",
                               reduce="sum")  # signed: |R| would rank as before
    assert float(ev.auc(rev["lerf"]) - ev.auc(rev["morf"])) == pytest.approx(-2.5)
    flat = ev.perturbation_curves(model, x, torch.ones_like(x), torch.tensor([0]), steps=4, replace="zero",
                                  score="logit")
    assert torch.allclose(flat["morf"][0], torch.tensor([10.0, 8, 4, 3, 0]))


def test_lrp_epsilon_ranks_linear_model_perfectly():
    w = torch.tensor([[[[2.0, 4.0], [1.0, 3.0]]]])
    model = Contrib(w)
    x = torch.ones(1, 1, 2, 2)
    rel = ev.lrp("epsilon")(model, x, torch.tensor([0]))
    assert torch.allclose(rel, x * w, atol=1e-4)
    res = ev.evaluate(model, x, torch.tensor([0]), ev.lrp("epsilon"), steps=4, replace="zero", score="logit",
                      progress=False)
    assert res.summary()["abpc"] == pytest.approx(2.5, abs=1e-4)


def _mask_model_and_data(n=16, seed=0):
    """Class evidence lives only in a 4×4 square: logits (s, -s) with s = Σ x over the square."""
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1

    class Masked(torch.nn.Module):
        def forward(self, x):
            s = (x * mask).flatten(1).sum(1)
            return torch.stack([s, -s], -1)

    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) + 0.5
    return Masked(), x, mask


def test_true_mask_beats_random_map():
    model, x, mask = _mask_model_and_data()
    y = torch.zeros(len(x), dtype=torch.long)
    truth = ev.evaluate(model, x, y, lambda m, a, t: mask.expand_as(a) * a, steps=16, replace="zero",
                        progress=False)
    rand = ev.evaluate(model, x, y, ev.random_attribution(0), steps=16, replace="zero", progress=False)
    inverse = ev.evaluate(model, x, y, lambda m, a, t: 1 - mask.expand_as(a), steps=16, replace="zero",
                          progress=False)
    st, sr, si = truth.summary(), rand.summary(), inverse.summary()
    assert st["abpc"] > sr["abpc"] + 0.2
    assert si["abpc"] < sr["abpc"] - 0.2
    assert st["comprehensiveness"] > sr["comprehensiveness"]
    assert st["sufficiency"] < sr["sufficiency"]
    # the mask is a quarter of the image: after 1/4 of the MoRF steps the evidence is gone (prob 0.5)
    assert torch.allclose(truth.morf[:, 4], torch.full((len(x),), 0.5))
    assert torch.allclose(truth.lerf[:, 12], truth.lerf[:, 0])  # LeRF keeps the square until 3/4


def test_patches_are_ranked_by_max_pooled_relevance():
    rel = torch.zeros(1, 3, 4, 4)
    rel[0, 1, 3, 0] = 5.0  # patch (1, 0) of 2×2 patches
    rel[0, 0, 0, 3] = -7.0  # patch (0, 1): largest |R| but negative
    s_abs = ev.unit_scores(rel, patch=2, reduce="abs")
    s_sum = ev.unit_scores(rel, patch=2, reduce="sum")
    assert s_abs.tolist() == [[0.0, 7.0, 5.0, 0.0]]
    assert s_sum.tolist() == [[0.0, 0.0, 5.0, 0.0]]
    x = torch.arange(48.0).view(1, 3, 4, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    c = ev.perturbation_curves(model, x, rel, torch.tensor([0]), steps=4, patch=2, reduce="sum",
                               replace="zero", score="logit")
    # step 1 zeroes patch (1, 0) in all channels: the logit equals the model on that masked input
    xm = x.clone()
    xm[..., 2:4, 0:2] = 0
    with torch.no_grad():
        assert float(c["morf"][0, 1]) == pytest.approx(float(model(xm)[0, 0]), rel=1e-5)
        assert float(c["morf"][0, 4]) == pytest.approx(float(model(torch.zeros_like(x))[0, 0]), rel=1e-5)


def test_blur_kernel_properties():
    assert ev.blur_params(224) == (51, 20.0)
    k, s = ev.blur_params(28)
    assert k % 2 == 1 and k == 7 and s == pytest.approx(2.5)
    g = ev.gaussian_kernel(51, 20.0, torch.float64)
    assert float(g.sum()) == pytest.approx(1.0)
    assert torch.equal(g, g.flip(0))
    assert int(g.argmax()) == 25 and bool((g[1:26] > g[:25]).all())
    const = torch.full((2, 3, 28, 28), 0.7)
    assert torch.allclose(ev.gaussian_blur(const), const, atol=1e-6)
    img = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    blurred = ev.gaussian_blur(img)
    assert float(blurred.var()) < 0.3 * float(img.var())  # smooths
    assert float(blurred.mean()) == pytest.approx(float(img.mean()), abs=0.02)  # ~keeps the mean
    with pytest.raises(ValueError):
        ev.gaussian_kernel(4, 1.0)
    small = ev.gaussian_blur(torch.rand(1, 1, 5, 5), 51, 20.0)  # kernel larger than the image: replicate
    assert small.shape == (1, 1, 5, 5) and bool(torch.isfinite(small).all())


def test_replacements_and_accuracy_score():
    x = torch.rand(3, 2, 4, 4)
    m = ev.replacement(x, "mean")
    assert torch.allclose(m[:, :, 0, 0], x.mean((2, 3)))
    n = ev.replacement(x, "noise", generator=torch.Generator().manual_seed(0))
    assert n.shape == x.shape and float(n.std()) > 0.5
    with pytest.raises(ValueError):
        ev.replacement(x, "nope")
    # dataset-accuracy variant: mean of the correctness curves
    model, xs, mask = _mask_model_and_data(8)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # half the labels wrong
    res = ev.evaluate(model, xs, y, lambda m_, a, t: mask.expand_as(a), steps=4, replace="zero",
                      score="correct", target="prediction", progress=False)
    assert res.mean_curves()["morf"][0] == pytest.approx(0.5)
    assert set(res.morf.unique().tolist()) <= {0.0, 1.0}


def test_token_accuracy_and_iou_toy_cases():
    r = torch.tensor([[0.1, 0.9, 0.3, 0.5], [0.8, 0.1, 0.2, 0.05]])
    assert ev.topk_accuracy(r, [[1], [0]], k=1) == 1.0
    assert ev.topk_accuracy(r, [[3], [2]], k=1) == 0.0
    assert ev.topk_accuracy(r, [[3], [2]], k=2) == pytest.approx(0.5)  # top2 {1,3} / {0,2}
    per = ev.topk_accuracy(r, [[3], [3]], k=2, reduction="none")
    assert per.tolist() == [0.5, 0.0]
    # IoU: row 0 top-2 {1,3} with span {2,3}: 1/3; row 1 top-2 {0,2} with span {2,3}: 1/3
    assert ev.topk_iou(r, [[2, 3], [2, 3]], k=2) == pytest.approx(1 / 3)
    assert ev.topk_iou(r, [[1, 3], [0]], reduction="none").tolist() == [1.0, 1.0]  # k = |span| per row
    assert ev.topk_iou(r, [[1, 3], [1, 2]], k=2, reduction="pooled") == pytest.approx((2 + 1) / (2 + 3))
    allowed = torch.tensor([[True, False, True, True]] * 2)  # mask position 1 (a "question" token)
    assert ev.topk_accuracy(r, [[3], [0]], k=1, allowed=allowed) == 1.0
    mask = ev.as_mask([[1], [0, 2]], (2, 4))
    assert mask.tolist() == [[False, True, False, False], [True, False, True, False]]


def test_token_deletion_curves():
    # a bag-of-tokens model: logit of class 0 = number of token 5 in the sequence
    class Count(torch.nn.Module):
        def forward(self, ids):
            s = (ids == 5).sum(1).float()
            return torch.stack([s, torch.zeros_like(s)], -1)

    ids = torch.tensor([[5, 1, 5, 2], [3, 5, 4, 4]])
    rel = (ids == 5).float()
    res = ev.token_deletion(Count(), ids, rel, torch.tensor([0, 0]), filler=0, score="logit")
    assert res.morf.tolist() == [[2, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert res.lerf.tolist() == [[2, 2, 2, 1, 0], [1, 1, 1, 1, 0]]
    assert float(res.abpc.mean()) > 0
    allowed = torch.tensor([[False, True, True, True]] * 2)
    res2 = ev.token_deletion(Count(), ids, rel, torch.tensor([0, 0]), filler=0, score="logit", allowed=allowed)
    assert res2.morf[0, -1] == 1  # the first token is never deleted


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    model, x, mask = _mask_model_and_data(4)
    y = torch.zeros(4, dtype=torch.long)
    res = {"mask": ev.evaluate(model, x, y, lambda m, a, t: mask.expand_as(a), steps=4, progress=False),
           "random": ev.evaluate(model, x, y, ev.random_attribution(), steps=4, progress=False)}
    path = ev.plot_curves(res, tmp_path / "c.png", title="toy")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 200_000


def test_errors():
    x = torch.rand(2, 1, 4, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match="shape"):
        ev.perturbation_curves(model, x, torch.rand(2, 1, 4, 3))
    with pytest.raises(ValueError, match="NaN"):
        ev.perturbation_curves(model, x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="patches"):
        ev.perturbation_curves(model, x, x, patch=3)


def test_several_scores_from_the_same_forwards():
    model, x, mask = _mask_model_and_data(6)
    y = torch.zeros(6, dtype=torch.long)
    both = ev.evaluate(model, x, y, lambda m, a, t: mask.expand_as(a), steps=4, score=("prob", "logit"),
                       progress=False)
    prob = ev.evaluate(model, x, y, lambda m, a, t: mask.expand_as(a), steps=4, score="prob", progress=False)
    assert set(both) == {"prob", "logit"}
    assert torch.allclose(both["prob"].morf, prob.morf)
    assert torch.allclose(both["logit"].morf.mul(2).sigmoid(), prob.morf)
