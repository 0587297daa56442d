"""Runs the examples in their `--smoke` mode."""

import os
import pathlib
import re
import subprocess
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_smoke(tmp_path):
    # The example imports keras_tkfac from this checkout whether or not it is installed.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    path = [str(_ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    result = subprocess.run(
        [sys.executable, str(_ROOT / "examples" / "demo.py"), "--smoke",
         f"--output_dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    table = (tmp_path / "demo.md").read_text()
    for name in ("TKFAC", "KFAC", "Adam", "SGD"):
        assert re.search(rf"^\| {name} \|", table, re.MULTILINE), table
    assert (tmp_path / "demo.png").stat().st_size > 0
