"""CI slice of the faithfulness study (benchmarks/faithfulness.py --quick): the code path runs and the table is
well formed (a few images and sentences, no LXT)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_faithfulness_quick_slice(tmp_path):
    pytest.importorskip("zennit")
    pytest.importorskip("captum")
    pytest.importorskip("transformers")
    parts = ["text"]
    if pathlib.Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        parts.append("fmnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faithfulness.py"), "--quick", "--part", *parts,
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    md = (tmp_path / "faithfulness.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (ours [\w +.γ_]+|random|captum \w+) \| ([^|]+)\|", md,
                                                        re.M)}
    assert "ours attnlrp" in rows and "random" in rows
    assert not any(v.strip().startswith("error") for v in rows.values()), md
    if "fmnist" in parts:
        assert "## Fashion-MNIST" in md and (tmp_path / "fmnist_prob.png").stat().st_size < 200_000
    assert "### bert" in md and "### llama" in md
    # the trained tiny LLaMA's deciding tokens are found by AttnLRP (top-1 accuracy in the table)
    llama = md.split("### llama")[1]
    top1 = float(re.search(r"^\| ours attnlrp \| ([\d.]+) \|", llama, re.M).group(1))
    assert top1 >= 0.75
