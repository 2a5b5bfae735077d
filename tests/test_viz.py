"""Image and token heatmaps (dynamiclrp.viz)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dynamiclrp import viz
from dynamiclrp.viz import colormaps


def test_core_import_does_not_load_plotting_libraries():
    code = ("import sys, dynamiclrp, dynamiclrp.viz, dynamiclrp.integrations; "
            "mods = ('matplotlib', 'PIL', 'transformers', 'torchvision', 'timm'); "
            "print(sorted(m for m in mods if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("name", colormaps.COLORMAPS)
def test_colormaps_are_tables_with_a_centre(name):
    t = viz.colormap(name)
    assert t.shape == (255, 3) and t.min() >= 0 and t.max() <= 1
    rgb = viz.apply_colormap(np.array([-1.0, 0.0, 1.0]), name)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3)
    if name in ("bwr", "rdbu"):
        assert (rgb[1] >= 240).all()  # zero is (near) white
        assert rgb[2, 0] > rgb[2, 2] and rgb[0, 2] > rgb[0, 0]  # positive red, negative blue
    if name == "coldhot":
        assert rgb[1].tolist() == [0, 0, 0]


def test_matplotlib_colormap_and_unknown_name():
    pytest.importorskip("matplotlib")
    assert viz.colormap("viridis").shape == (255, 3)
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.colormap("no-such-map")


def test_symmetric_normalisation():
    v = np.array([[-2.0, 0.0], [1.0, 4.0]])
    n = viz.symmetric_normalize(v)
    assert n.tolist() == [[-0.5, 0.0], [0.25, 1.0]]
    assert viz.symmetric_normalize(v, scale=2.0).tolist() == [[-1.0, 0.0], [0.5, 1.0]]
    assert not viz.symmetric_normalize(np.zeros((2, 2))).any()
    assert np.isfinite(viz.symmetric_normalize(np.array([np.nan, 1.0]))).all()


def test_relevance_map_reduces_channels():
    r = torch.zeros(1, 3, 4, 5)
    r[0, 0, 1, 1], r[0, 1, 1, 1] = 1.0, -3.0
    assert viz.relevance_map(r)[1, 1] == -2.0
    assert viz.relevance_map(r, "abs")[1, 1] == 4.0
    assert viz.relevance_map(r, "max")[1, 1] == -3.0
    with pytest.raises(ValueError):
        viz.relevance_map(np.zeros(3))


def test_heatmap_overlay_grid_shapes():
    rel = torch.randn(3, 8, 6)
    h = viz.heatmap(rel)
    assert h.shape == (8, 6, 3) and h.dtype == np.uint8
    img = torch.rand(3, 16, 12)  # larger than the relevance: heatmap resized
    o = viz.overlay(img, rel)
    assert o.shape == (16, 12, 3) and o.dtype == np.uint8
    # no relevance: the overlay is the (dimmed grey) image, not a colour
    flat = viz.overlay(np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4)))
    assert (flat == flat[0, 0]).all() and flat[0, 0, 0] == flat[0, 0, 1]
    g = viz.grid([h, o], ncols=2, pad=2)
    assert g.shape == (2 + 16 + 2, 2 + 2 * (12 + 2), 3)
    # normalised images are stretched or de-normalised
    x = (torch.rand(3, 4, 4) - 0.5) * 4
    assert viz.to_image(x).shape == (4, 4, 3)
    assert viz.to_image(x, mean=(0.5,) * 3, std=(0.2,) * 3).dtype == np.uint8


def test_png_and_figure(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    p = viz.save_png(viz.heatmap(np.random.default_rng(0).normal(size=(9, 9))), tmp_path / "h.png")
    with PIL.open(p) as im:
        assert im.size == (9, 9)
    imgs = [np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8)] * 2
    rels = [np.random.default_rng(2).normal(size=(3, 20, 20)), np.zeros((20, 20))]
    f = viz.save_heatmap_figure(tmp_path / "fig.png", imgs, rels, titles=["one", "two"], cmap="rdbu")
    with PIL.open(f) as im:
        im.verify()
    with pytest.raises(ValueError):
        viz.save_heatmap_figure(tmp_path / "bad.png", imgs, rels[:1])


# ---------------------------------------------------------------------------------------------------- tokens


def test_wordpiece_pieces_are_joined_and_summed():
    words = viz.group_tokens(["[CLS]", "un", "##believ", "##able", "film", "[SEP]"],
                             [0.5, 1.0, 2.0, 3.0, -1.0, 0.25], special=[1, 0, 0, 0, 0, 1])
    assert [w.text for w in words] == ["[CLS]", "unbelievable", "film", "[SEP]"]
    assert words[1].relevance == 6.0 and words[1].pieces == ["un", "##believ", "##able"]
    assert words[0].special and words[-1].special and not words[1].special
    assert sum(w.relevance for w in words) == pytest.approx(5.75)
    assert len(viz.group_tokens(["un", "##able"], [1, 1], join=False)) == 2


def test_bpe_and_sentencepiece_markers():
    bpe = viz.group_tokens(["The", "Ġcap", "ital", "Ġis"], [1, 2, 3, 4])
    assert [(w.text, w.relevance) for w in bpe] == [("The", 1.0), ("capital", 5.0), ("is", 4.0)]
    sp = viz.group_tokens(["▁The", "▁cap", "ital"], [1, 2, 3])
    assert [w.text for w in sp] == ["The", "capital"]


def test_offsets_show_the_original_text():
    text = "Hello, wonderful world"
    tokens = ["[CLS]", "hello", ",", "wonder", "##ful", "world", "[SEP]"]
    offsets = [(0, 0), (0, 5), (5, 6), (7, 13), (13, 16), (17, 22), (0, 0)]
    words = viz.group_tokens(tokens, np.arange(7.0), special=[1, 0, 0, 0, 0, 0, 1], offsets=offsets, text=text)
    assert [w.text for w in words] == ["[CLS]", "Hello,", "wonderful", "world", "[SEP]"]
    assert words[2].space == " " and words[2].relevance == 7.0
    # byte-level BPE offsets include the space before a word
    words = viz.group_tokens(["a", "Ġb", "c"], [1, 1, 1], offsets=[(0, 1), (1, 3), (3, 4)], text="a bc")
    assert [w.text for w in words] == ["a", "bc"]


def test_token_html_escapes_colours_and_marks_special():
    frag = viz.token_html(["[CLS]", "<script>", "good", "[SEP]"], [9.0, -1.0, 1.0, 0.0],
                          special=[1, 0, 0, 1], title="a & b")
    assert "<script>" not in frag and "&lt;script&gt;" in frag and "a &amp; b" in frag
    assert frag.count("dlrp-special") == 2
    assert "background:rgb(255,0,0)" in frag  # the scale ignores special tokens: 'good' is full red
    assert "background:rgb(0,0,255)" in frag
    page = viz.token_html_page([frag])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page


def test_token_ansi():
    s = viz.token_ansi(["[CLS]", "good", "bad"], [0.0, 1.0, -1.0], special=[1, 0, 0])
    assert "\x1b[48;2;255;0;0m" in s.replace("30;", "").replace("97;", "")
    assert "\x1b[2m[CLS]" in s and s.endswith("\x1b[0m")
    assert viz.token_ansi(["a", "b"], [0.5, -0.25], color=False) == "a[+0.5] b[-0.25]"
    with pytest.raises(ValueError):
        viz.token_ansi(["a"], [1.0, 2.0])


def test_save_token_html(tmp_path):
    p = viz.save_token_html(tmp_path / "t" / "x.html", viz.token_html(["a"], [1.0]), title="T")
    assert p.read_text().count("dlrp-tokens") >= 1
