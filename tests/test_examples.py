"""Smoke test of examples/: every script runs offline and exits cleanly.

The scripts run in one subprocess, one after the other, each as ``__main__`` with its own argv (runpy), so that
torch and transformers are imported once; a failing script reports its traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["quickstart", "image_classification", "vit", "text_classification", "qa", "llm_next_token"]

RUNNER = r"""
import contextlib, io, json, runpy, sys, time, traceback
results = {}
for name, path in json.loads(sys.argv[1]):
    out = io.StringIO()
    t0 = time.perf_counter()
    sys.argv = [path]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        results[name] = {"ok": True}
    except SystemExit as e:
        results[name] = {"ok": not e.code, "error": f"exit {e.code}"}
    except BaseException:
        results[name] = {"ok": False, "error": traceback.format_exc()}
    results[name].update(stdout=out.getvalue()[-2000:], seconds=time.perf_counter() - t0)
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("skimage")
    scripts = [(n, str(ROOT / "examples" / f"{n}.py")) for n in EXAMPLES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TMPDIR": str(tmp_path_factory.mktemp("examples"))}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(scripts)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, r.stderr[-3000:]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(results, name):
    res = results[name]
    assert res["ok"], res.get("error")
    assert res["stdout"].strip()
