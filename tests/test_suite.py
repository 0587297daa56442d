"""Runs `tools/suite.py --smoke` over every workload and optimizer."""

import json
import math
import os
import subprocess
import sys

from tests.test_examples import _ROOT

# Two processes, about equally long, run at once: each is mostly single-threaded.
_GROUPS = [["resnet", "lstm", "autoencoder", "conv_autoencoder"],
           ["transformer", "timeseries", "mlp", "convnet"]]
_OPTIMIZERS = ["TKFAC", "KFAC", "Adam", "AdamW", "Muon", "SGD"]


def test_suite_smoke(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(_ROOT), env.get("PYTHONPATH")] if p)
    processes = []
    for i, group in enumerate(_GROUPS):
        # Eagerly: tracing 48 tiny runs takes minutes; the numbers do not matter here.
        processes.append(subprocess.Popen(
            [sys.executable, str(_ROOT / "tools" / "suite.py"), "--smoke",
             "--run_eagerly", f"--workloads={','.join(group)}",
             f"--output_dir={tmp_path / str(i)}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for i, (group, process) in enumerate(zip(_GROUPS, processes)):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-5000:]
        report = (tmp_path / str(i) / "suite.md").read_text()
        assert report in stdout
        summary = json.loads((tmp_path / str(i) / "suite.json").read_text())
        assert list(summary["workloads"]) == group
        for workload, entry in summary["workloads"].items():
            assert math.isfinite(entry["target"]), workload
            assert sorted(entry["results"]) == sorted(_OPTIMIZERS), workload
            for name, outcome in entry["results"].items():
                assert outcome["status"] == "ok", (workload, name, outcome)
                assert math.isfinite(outcome["best_val_loss"]), (workload, name)
            assert f"## {workload}" in report
        assert len(summary["runs"]) == len(group) * len(_OPTIMIZERS)
        assert (tmp_path / str(i) / "suite.png").stat().st_size > 0
    # `tools/compare_suites.py` recomputes the suite's summary from its json.
    sys.path.insert(0, str(_ROOT / "tools"))
    import compare_suites  # pylint: disable=import-outside-toplevel

    for i in range(len(_GROUPS)):
        report = (tmp_path / str(i) / "suite.md").read_text()
        final = next(line for line in report.splitlines()
                     if line.startswith("**TKFAC best validation loss"))
        better, faster = (int(part.split("/")[0].split()[-1]) for part in
                          final.split(": ")[1:3])
        geomean = final.split("seconds to target: ")[1].split()[0]
        lines = compare_suites.compare([str(tmp_path / str(i))])
        assert lines[-1].endswith(
            f"on {better}/4, less wall-clock to target on {faster}/4, geometric mean "
            f"of seconds to target over Adam's {geomean}."), (lines[-1], final)
