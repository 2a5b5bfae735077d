"""The command line: every command on small models, output files, error paths, unsafe weight files."""

from __future__ import annotations

import html.parser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamiclrp.cli import main

PIL = pytest.importorskip("PIL.Image")

FACTORY = textwrap.dedent("""
    import torch

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(6, 5))

    def gray():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))

    def not_a_model():
        return 42
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    (root / "nets.py").write_text(FACTORY)
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        PIL.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(imgs / name)
    (imgs / "notes.txt").write_text("not an image")
    return {"root": root, "factory": root / "nets.py", "imgs": imgs, "a": imgs / "a.png", "b": imgs / "b.jpg"}


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def is_png(path: Path) -> bool:
    with PIL.open(path) as im:
        im.verify()
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def is_html(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    parser = html.parser.HTMLParser()
    parser.feed(text)
    parser.close()
    return text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def one_line_error(code: int, err: str) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dynamiclrp: error:"), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------------- help


def test_entry_point_help():
    exe = Path(sys.executable).with_name("dynamiclrp")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dynamiclrp"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for word in ("demo", "explain", "coverage", "presets"):
        assert word in r.stdout


@pytest.mark.parametrize("args", [["demo"], ["explain"], ["explain", "image"], ["explain", "text"], ["coverage"],
                                  ["presets"]])
def test_subcommand_help(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: dynamiclrp" in out and "--debug" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------- presets


def test_presets(capsys):
    code, out, _ = run(["presets"], capsys)
    assert code == 0
    for name in ("epsilon", "epsilon_gamma_box", "attnlrp", "cp_lrp", "paper"):
        assert f"{name}:" in out
    assert "Gamma(" in out and "AttnLRPSoftmax" in out
    code, out, _ = run(["presets", "attnlrp"], capsys)
    assert code == 0 and out.startswith("attnlrp:") and "epsilon:" not in out
    one_line_error(*run(["presets", "nope"], capsys)[::2])


# ---------------------------------------------------------------------------------------------- explain image


def save_weights(files, kind: str) -> Path:
    ns: dict = {}
    exec(FACTORY, ns)  # noqa: S102 - our own test source
    sd = ns["make"]().state_dict()
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = files["root"] / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = files["root"] / "w.pt"
        torch.save({"state_dict": sd}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_explain_image_factory_with_weights(files, tmp_path, capsys, kind):
    w = save_weights(files, kind)
    code, out, err = run(["explain", "image", f"{files['factory']}:make", files["a"], "--weights", w,
                          "--size", "24", "--out", tmp_path, "--npy"], capsys)
    assert code == 0, err
    png = tmp_path / "a_lrp.png"
    assert is_png(png) and "class" in out and str(png) in out
    rel = np.load(tmp_path / "a_lrp.npy")
    assert rel.shape == (3, 24, 24) and np.isfinite(rel).all() and np.abs(rel).sum() > 0


def test_explain_image_folder_target_single_png(files, tmp_path, capsys):
    code, out, err = run(["explain", "image", f"{files['factory']}:make", files["imgs"], "--size", "16",
                          "--target", "2", "--preset", "epsilon_plus", "--out", tmp_path], capsys)
    assert code == 0, err
    assert is_png(tmp_path / "a_lrp.png") and is_png(tmp_path / "b_lrp.png")
    assert out.count("class 2") == 2
    code, _, err = run(["explain", "image", f"{files['factory']}:make", files["a"], "--size", "16",
                        "--out", tmp_path / "one.png", "--cmap", "coldhot"], capsys)
    assert code == 0, err
    assert is_png(tmp_path / "one.png")


def test_explain_image_torchvision(files, tmp_path, capsys):
    pytest.importorskip("torchvision")
    code, out, err = run(["explain", "image", "torchvision:resnet18", files["a"], "--size", "32", "--out",
                          tmp_path], capsys)
    assert code == 0, err
    assert is_png(tmp_path / "a_lrp.png")


def test_explain_image_errors(files, tmp_path, capsys):
    fac = f"{files['factory']}:make"
    one_line_error(*run(["explain", "image", fac, tmp_path / "missing.png"], capsys)[::2])
    one_line_error(*run(["explain", "image", "torchvision:no_such_net", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", "timm:no_such_net", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", "no_such_source", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", f"{tmp_path / 'missing.py'}:make", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", f"{files['factory']}:nope", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", f"{files['factory']}:not_a_model", files["a"]], capsys)[::2])
    one_line_error(*run(["explain", "image", fac, files["a"], "--weights", tmp_path / "none.pt"], capsys)[::2])
    one_line_error(*run(["explain", "image", fac, files["a"], "--size", "16", "--target", "99"], capsys)[::2])
    one_line_error(*run(["explain", "image", fac, files["a"], "--preset", "nope"], capsys)[::2])
    one_line_error(*run(["explain", "image", fac, files["imgs"] / "notes.txt", "--size", "16"], capsys)[::2])
    # weights of another architecture
    bad = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bad)
    code, _, err = run(["explain", "image", fac, files["a"], "--weights", bad], capsys)
    one_line_error(code, err)
    assert "do not fit" in err


def test_explain_image_wrong_input_shape(files, capsys):
    code, _, err = run(["explain", "image", f"{files['factory']}:gray", files["a"], "--size", "16"], capsys)
    one_line_error(code, err)
    assert "cannot take an input of shape (1, 3, 16, 16)" in err


def test_debug_shows_the_traceback(files):
    with pytest.raises(Exception, match="no_such_net"):
        main(["explain", "image", "torchvision:no_such_net", str(files["a"]), "--debug"])


class Evil:
    """Unpickling this would create a file: the weight loader must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(files, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": Evil(str(marker))}, evil)
    assert not marker.exists()
    code, _, err = run(["explain", "image", f"{files['factory']}:make", files["a"], "--weights", evil,
                        "--size", "16", "--out", tmp_path], capsys)
    one_line_error(code, err)
    assert "refusing" in err and "weights_only" in err
    assert not marker.exists()
    code, _, err = run(["coverage", f"{files['factory']}:make", "--weights", evil], capsys)
    one_line_error(code, err)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------- coverage


def test_coverage_image_models(files, capsys):
    code, out, err = run(["coverage", f"{files['factory']}:make", "--input-shape", "1,3,16,16"], capsys)
    assert code == 0, err
    assert "ConvolutionBackward0" in out and "(100.00 %)" in out
    pytest.importorskip("torchvision")
    code, out, err = run(["coverage", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--preset",
                          "epsilon_plus"], capsys)
    assert code == 0, err
    assert "rule (epsilon_plus)" in out


def test_coverage_errors(files, capsys):
    code, _, err = run(["coverage", f"{files['factory']}:gray", "--input-shape", "1,3,8,8"], capsys)
    one_line_error(code, err)
    with pytest.raises(SystemExit):
        main(["coverage", "x.py:f", "--input-shape", "1,a"])


# ------------------------------------------------------------------------------------------------ explain text


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    import hf_tiny

    root = tmp_path_factory.mktemp("hf")
    return {"cls": hf_tiny.bert_dir(root / "cls"), "qa": hf_tiny.bert_dir(root / "qa", "qa"),
            "lm": hf_tiny.gpt2_dir(root / "lm")}


def test_explain_text_classification(hf_dirs, tmp_path, capsys):
    out_html = tmp_path / "t.html"
    code, out, err = run(["explain", "text", hf_dirs["cls"], "A wonderful movie.", "Dreadful!", "--out", out_html,
                          "--color", "always"], capsys)
    assert code == 0, err
    assert is_html(out_html)
    page = out_html.read_text()
    assert "wonderful" in page and "dlrp-special" in page and page.count('class="dlrp-tokens"') == 2
    assert "\x1b[" in out and ("positive" in out or "negative" in out)
    code, out, err = run(["explain", "text", hf_dirs["cls"], "plain text", "--target", "0", "--color", "never"],
                         capsys)
    assert code == 0 and "\x1b[" not in out and "negative" in out


def test_explain_text_subtract_addends(hf_dirs, capsys):
    """``--subtract-addends`` reaches explain: the approximation is used and reported, the prediction is the same."""
    args = ["explain", "text", hf_dirs["cls"], "A wonderful movie.", "--color", "never"]
    code, exact, err = run(args, capsys)
    assert code == 0, err
    with pytest.warns(UserWarning, match="subtract_addends"):
        code, fast, err = run(args + ["--subtract-addends"], capsys)
    assert code == 0, err
    assert fast.splitlines()[0] == exact.splitlines()[0]  # the explained label


def test_explain_text_qa(hf_dirs, tmp_path, capsys):
    out_html = tmp_path / "qa.html"
    code, out, err = run(["explain", "text", hf_dirs["qa"], "The cat sat on the mat.", "--question",
                          "Where did the cat sit?", "--out", out_html], capsys)
    assert code == 0, err
    assert "answer:" in out and "answer start" in out and "answer end" in out
    assert is_html(out_html)


def test_explain_text_causal_lm(hf_dirs, tmp_path, capsys):
    code, out, err = run(["explain", "text", hf_dirs["lm"], "the capital of france is", "--color", "never"],
                         capsys)
    assert code == 0, err
    assert "next token" in out and "capital[" in out  # byte-level pieces joined into words
    out_html = tmp_path / "gen.html"
    code, out, err = run(["explain", "text", hf_dirs["lm"], "the cat", "--generate", "2", "--out", out_html],
                         capsys)
    assert code == 0, err
    assert out.count("→") == 2 and is_html(out_html)
    code, out, err = run(["explain", "text", hf_dirs["lm"], "the cat", "--next-token", " sat"], capsys)
    assert code == 0, err


def test_explain_text_errors(hf_dirs, tmp_path, capsys):
    one_line_error(*run(["explain", "text", tmp_path / "nope", "hi"], capsys)[::2])
    one_line_error(*run(["explain", "text", tmp_path, "hi"], capsys)[::2])  # no config.json
    one_line_error(*run(["explain", "text", hf_dirs["qa"], "context only"], capsys)[::2])
    one_line_error(*run(["explain", "text", hf_dirs["cls"], "x", "--target", "7"], capsys)[::2])
    one_line_error(*run(["explain", "text", hf_dirs["cls"], "x", "--preset", "nope"], capsys)[::2])


def test_coverage_hf_folder(hf_dirs, capsys):
    code, out, err = run(["coverage", hf_dirs["lm"], "--preset", "attnlrp"], capsys)
    assert code == 0, err
    assert "EmbeddingBackward0" in out and "(100.00 %)" in out


def test_demo_help_mentions_out(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--out" in capsys.readouterr().out


def test_module_entry_point_runs_presets():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dynamiclrp", "presets", "paper"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("paper:")
