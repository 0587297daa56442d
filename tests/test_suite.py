"""Runs `tools/suite.py --smoke` over every workload and optimizer."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests import helpers
from tests.test_examples import _ROOT

# Two processes, about equally long, run at once (each is mostly single-threaded):
# every workload (and the optional language model) with TKFAC and Adam (the
# target's reference); then a third process runs the other optimizers on the MLP
# (the tool builds them all alike). KFAC on every workload (the same engine as
# TKFAC's; +45 s) is in `make test-all`.
_GROUPS = [["resnet", "lstm", "autoencoder", "conv_autoencoder"],
           ["transformer", "timeseries", "mlp", "convnet", "language_model"], ["mlp"]]
_OPTIMIZERS = {
    "tkfac": [["TKFAC", "Adam"]] * 2 + [["Adam", "KFAC", "AdamW", "Muon", "SGD"]],
    "curvature": [["TKFAC", "KFAC", "Adam"]] * 2 + [["Adam", "AdamW", "Muon", "SGD"]],
}


def _start(i, optimizers, tmp_path, env):
    # Eagerly: tracing 48 tiny runs takes minutes; the numbers do not matter here.
    return subprocess.Popen(
        [sys.executable, str(_ROOT / "tools" / "suite.py"), "--smoke",
         "--run_eagerly", f"--workloads={','.join(_GROUPS[i])}",
         f"--optimizers={','.join(optimizers[i])}", f"--output_dir={tmp_path / str(i)}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("optimizers", [
    "tkfac", pytest.param("curvature", marks=pytest.mark.slow)])
def test_suite_smoke(tmp_path, optimizers):
    optimizers = [helpers.without_muon_where_it_fails(o) for o in _OPTIMIZERS[optimizers]]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(_ROOT), env.get("PYTHONPATH")] if p)
    processes = {i: _start(i, optimizers, tmp_path, env) for i in (0, 1)}
    for i in [1, 0, 2]:  # the second group is the shorter (~50 s against ~80 s)
        group = _GROUPS[i]
        stdout, stderr = processes[i].communicate(timeout=600)
        if i == 1:
            processes[2] = _start(2, optimizers, tmp_path, env)
        assert processes[i].returncode == 0, stderr[-5000:]
        report = (tmp_path / str(i) / "suite.md").read_text()
        assert report in stdout
        summary = json.loads((tmp_path / str(i) / "suite.json").read_text())
        assert list(summary["workloads"]) == group
        for workload, entry in summary["workloads"].items():
            assert math.isfinite(entry["target"]), workload
            assert sorted(entry["results"]) == sorted(optimizers[i]), workload
            for name, outcome in entry["results"].items():
                assert outcome["status"] == "ok", (workload, name, outcome)
                assert math.isfinite(outcome["best_val_loss"]), (workload, name)
            assert f"## {workload}" in report
        assert len(summary["runs"]) == len(group) * len(optimizers[i])
        assert (tmp_path / str(i) / "suite.png").stat().st_size > 0
    # `tools/compare_suites.py` recomputes the suite's summary from its json.
    sys.path.insert(0, str(_ROOT / "tools"))
    import compare_suites  # pylint: disable=import-outside-toplevel

    for i in range(2):
        report = (tmp_path / str(i) / "suite.md").read_text()
        final = next(line for line in report.splitlines()
                     if line.startswith("**TKFAC best validation loss"))
        better, faster = (int(part.split("/")[0].split()[-1]) for part in
                          final.split(": ")[1:3])
        geomean = final.split("seconds to target: ")[1].split()[0]
        lines = compare_suites.compare([str(tmp_path / str(i))])
        n = len(_GROUPS[i])
        assert lines[-1].endswith(
            f"on {better}/{n}, less wall-clock to target on {faster}/{n}, geometric "
            f"mean of seconds to target over Adam's {geomean}."), (lines[-1], final)
