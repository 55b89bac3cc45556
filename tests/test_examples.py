"""The examples run as a user runs them (a fresh process, offline) and print sane results."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _metric(output, name):
    return float(re.search(r"%s: ([0-9.]+)" % re.escape(name), output).group(1))


def test_quickstart(tmp_path):
    out = _run("quickstart.py", "--output", str(tmp_path / "fig.png"), cwd=tmp_path)
    # the embedded sample is easy for PatchCore with ImageNet features
    assert _metric(out, "image AUROC") >= 0.95
    assert _metric(out, "pixel AUROC") >= 0.95
    assert 0.8 <= _metric(out, "PRO (FPR <= 0.3)") <= 1.0
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_model_selection(tmp_path):
    saved = tmp_path / "best.joblib"
    out = _run("model_selection.py", "--output", str(saved), cwd=tmp_path)
    scores = [float(s) for s in re.findall(r"PRO ([0-9.]+) \+-", out)]
    assert len(scores) == 4 and all(0.5 < s <= 1.0 for s in scores), out
    best = float(re.search(r"\(PRO ([0-9.]+)\)", out).group(1))
    assert best == pytest.approx(max(scores), abs=1e-3)
    assert "refit on the 38 normal images" in out
    assert "predicts identical maps: True" in out
    assert saved.stat().st_size > 0
