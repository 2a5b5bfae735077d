"""The `attnlrp` and `cp_lrp` presets against the real LXT 2.1 (`lxt.efficient`, transformers 4.x), float64.

Same random model, input and target; LXT's relevance is input × modified gradient at the embeddings with the
logit as seed, which is our convention (seed = the output value) summed over the hidden dimension: the token
relevance must agree to 1e-5 relative (measured: 4e-9 to 3e-7). Each case runs in its own process because LXT
patches transformers' modules globally. LXT has no CP-LRP for BERT.

torchvision ViT-B/16 (random weights, 64² input: 16 patches and the class token; at 224², the same code, 4e-7 in
benchmarks/equivalence.py, about 40 s of CPU) follows LXT's own ViT recipe, CP-LRP in the attention plus zennit's
γ on the convolution and linear layers (tests/lxt_case.py, ``vit``). The pretrained MiniLM is in
test_compare_pretrained.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lxt")
transformers = pytest.importorskip("transformers")
TF5 = int(transformers.__version__.split(".")[0]) >= 5
pytestmark = [pytest.mark.compare, pytest.mark.skipif(TF5, reason="LXT 2.1 needs transformers < 5")]

CASES = [(m, p, a, f) for m in ("llama", "qwen3", "gemma3", "gpt2") for p in ("attnlrp", "cp_lrp")
         for a in ("eager", "sdpa") for f in ("relevance", "gradient")] + [
    ("bert", "attnlrp", a, f) for a in ("eager", "sdpa") for f in ("relevance", "gradient")]


def run_case(*args: str) -> tuple[float, float, float, float, float]:
    """Run tests/lxt_case.py in its own process: (rel. difference, seed ours, seed LXT, Σ ours, Σ LXT)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).with_name("lxt_case.py")
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rel, seed_ours, seed_lxt, sum_ours, sum_lxt = map(float, done.stdout.split()[-5:])
    return rel, seed_ours, seed_lxt, sum_ours, sum_lxt


@pytest.mark.parametrize("model,preset,attn,form", CASES, ids=["-".join(c) for c in CASES])
def test_matches_lxt(model, preset, attn, form):
    """Both ways of propagating: node by node (relevance) and in one gradient pass (gradient form)."""
    rel, seed_ours, seed_lxt, _, _ = run_case(model, preset, attn, form)
    assert seed_ours == pytest.approx(seed_lxt, rel=1e-12)  # the same prediction explained
    assert rel < 1e-5, rel


@pytest.mark.slow
def test_vit_b16_matches_lxt_with_zennit_gamma():
    """ViT-B/16: our cp_lrp with Gamma(0.25) on convolutions and Gamma(0.05) on dense layers (ε → 0 for the
    attention's projections, which zennit never sees as modules) against LXT + zennit γ; pixel relevance."""
    rel, seed_ours, seed_lxt, sum_ours, sum_lxt = run_case("vit", "cp_lrp", "64")
    assert seed_ours == pytest.approx(seed_lxt, rel=1e-12)
    assert sum_ours == pytest.approx(sum_lxt, rel=1e-5)
    assert rel < 1e-5, rel  # measured 1.6e-7
