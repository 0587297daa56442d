r"""TKFAC across several workload-suite runs, side by side, from their `suite.json`.

Each run is one `tools/suite.py --optimizers=Adam,TKFAC --output_dir=DIR` (its own
Adam grid, so each TKFAC configuration is compared with the Adam of the same run):

    python tools/compare_suites.py docs/suite_graft docs/suite_quadratic \
        docs/suite_graft_quadratic

Per workload: TKFAC's best validation loss (bold where it is at most the best Adam's
of its run), its steps to the target (Adam's in brackets) and its seconds to the
target over Adam's, with the suite's rules (`tools/suite.py`); then the suite's three
summary figures for each run.
"""

import json
import math
import os
import sys

from absl import app
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402  (absl flags are defined but not parsed here)


def load(directory):
    """`(command, {workload: (target, steps, best Adam run, TKFAC run)})`."""
    with open(os.path.join(directory, "suite.json")) as f:
        data = json.load(f)
    runs = [suite.Run(r["workload"], r["optimizer"], r["config"], r["status"],
                      np.array(r["evals"], dtype=float).reshape(-1, 3),
                      np.array(r["step_losses"]), np.array(r["step_seconds"]))
            for r in data["runs"]]
    found = {}
    for name, workload in data["workloads"].items():
        adam = [r for r in runs if r.workload == name and r.optimizer == "Adam"]
        tkfac = [r for r in runs if r.workload == name and r.optimizer == "TKFAC"]
        if adam and tkfac:
            found[name] = (workload["target"], workload["steps"],
                           suite._select(adam), suite._select(tkfac))
    return data["command"], found


def compare(directories):
    """Markdown lines of the comparison."""
    loaded = [load(d) for d in directories]
    labels = [os.path.basename(os.path.normpath(d)) for d in directories]
    head = "| workload | target | " + " | ".join(
        f"{label}: best val | steps (Adam) | s / Adam" for label in labels) + " |"
    lines = ["Runs: " + "; ".join(f"`{command}`" for command, _ in loaded), "",
             head, "|---|---:|" + "---:|---:|---:|" * len(labels)]
    summary = {label: [0, 0, [], 0] for label in labels}
    for name in loaded[0][1]:
        row = [name, f"{loaded[0][1][name][0]:.4g}"]
        for label, (_, found) in zip(labels, loaded):
            if name not in found:
                row += ["n/a"] * 3
                continue
            target, steps, adam, tkfac = found[name]
            loss = suite.best_val(tkfac)
            better = tkfac.status == "ok" and loss <= suite.best_val(adam)
            mine, base = suite.reached(tkfac, target), suite.reached(adam, target)
            seconds_text, seconds = suite._ratio(tkfac, adam, target, steps, 1)
            row += [f"**{loss:.4g}**" if better else f"{loss:.4g} ({tkfac.status})"
                    if tkfac.status != "ok" else f"{loss:.4g}",
                    f"{mine[0] or 'not reached'} ({base[0] or 'n/a'})", seconds_text]
            counts = summary[label]
            counts[0] += better
            if seconds is not None:
                counts[2].append(math.log(seconds))
                counts[1] += mine[1] is not None and seconds < 1
            counts[3] += 1
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for label, (better, faster, logs, n) in summary.items():
        geomean = f"{math.exp(np.mean(logs)):.2f}" if logs else "n/a"
        lines.append(f"- {label}: best validation loss <= best Adam's on {better}/{n}, "
                     f"less wall-clock to target on {faster}/{n}, geometric mean of "
                     f"seconds to target over Adam's {geomean}.")
    return lines


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Pass one or more suite output directories.")
    print("\n".join(compare(argv[1:])))


if __name__ == "__main__":
    app.run(main)
