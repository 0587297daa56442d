"""Runs the examples in their `--smoke` mode."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests import helpers

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


# The smoke tests of the one-off measurement tools behind README figures (each a
# subprocess of 30-70 s here) run under `make test-all`, not `make test`, whose time on
# the 2-core CI machine had grown to 28 minutes. The demo, the examples and the
# benchmark, suite, step-cost and Fisher-report tools keep theirs in `make test`.
_ONE_MEASUREMENT_TOOL = pytest.mark.slow


def _run(script, *args, timeout=300):
    """Runs `script` (relative to the root) with this checkout on the path."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    path = [str(_ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return subprocess.run(
        [sys.executable, str(_ROOT / script), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("examples/mnist_mlp.py", [], r"tkfac: train loss .* test accuracy 0\.\d+"),
        ("examples/mnist_autoencoder.py", [], r"tkfac: train loss .* test loss 0\.\d+"),
        ("examples/custom_loop.py", [], r"after 20 steps: .* failed inverses 0"),
        ("examples/q_learning.py", [],
         r"tkfac: 300 steps, \d+ episodes; greedy policy .* mean loss of the last "
         r"100 updates \d\.\d+e[-+]\d+"),
        ("examples/lora_fine_tuning.py", [],
         r"tkfac: test loss \d\.\d+, test accuracy [01]\.\d+ \(digits 5-9\)"),
        ("examples/structured_data.py", [],
         r"tkfac: \d+ epochs, validation loss 0\.\d+, validation accuracy [01]\.\d+"),
        ("examples/text_classifier.py", ["--dataset=synthetic"],
         r"transformer, tkfac: test loss \d\.\d+, test accuracy 0\.\d+"),
        # The BiLSTM's smoke run traces the recurrent layers' products (~30 s).
        pytest.param("examples/text_classifier.py",
                     ["--dataset=synthetic", "--model=bilstm"],
                     r"bilstm, tkfac: test loss \d\.\d+, test accuracy 0\.\d+",
                     marks=pytest.mark.slow),
        # The ResNet example takes ~45 s; the ResNet benchmark smoke (slow too)
        # and the conv tests cover its layers.
        pytest.param("examples/cifar10_resnet.py", ["--dataset=digits"],
                     r"\| tkfac \|.*\n\| kfac \|.*\n\| sgd \|",
                     marks=pytest.mark.slow),
    ],
)
def test_example_smoke(script, args, expected):
    result = _run(script, "--smoke", *args)
    assert result.returncode == 0, result.stderr[-5000:]
    assert re.search(expected, result.stdout), result.stdout[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None,
    reason="tensorflow_datasets is installed: the run would try to download",
)
@pytest.mark.parametrize(
    "script", ["examples/cifar10_resnet.py", "tools/benchmark.py"]
)
def test_tfds_dataset_unavailable_says_so_in_one_line(script):
    result = _run(script, "--smoke", "--dataset=cifar10")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "cifar10" in last and "--dataset=mnist5k" in last, result.stderr[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None,
    reason="tensorflow_datasets is installed: the run would try to download",
)
def test_structured_example_without_titanic_names_the_offline_data_set():
    result = _run("examples/structured_data.py", "--dataset=titanic")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "'titanic'" in last and "--dataset=synthetic" in last, result.stderr[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None,
    reason="tensorflow_datasets is installed: the run would try to download",
)
def test_text_example_without_imdb_names_the_offline_data_set():
    result = _run("examples/text_classifier.py", "--smoke")  # imdb_reviews: default
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "imdb_reviews" in last and "--dataset=synthetic" in last, result.stderr[-3000:]


@pytest.mark.parametrize(
    "problem, names",
    [
        ("mlp", ["TKFAC", "KFAC", "Adam", "SGD", "Muon"]),
        # Fewer optimizers: each one traces for seconds. The same tool as the MLP's
        # on bigger models (~25-35 s each): `make test-all`.
        pytest.param("autoencoder", ["TKFAC", "Adam"], marks=pytest.mark.slow),
        pytest.param("resnet", ["TKFAC", "Adam"], marks=pytest.mark.slow),
    ],
)
def test_benchmark_smoke(problem, names, tmp_path):
    # A grid may hold strings and booleans (step controls, switches), not only numbers.
    grid = '{"KFAC": {"step_control": ["trust_region"], "inverse_warmup": [false]}}'
    names = helpers.without_muon_where_it_fails(names)
    result = _run("tools/benchmark.py", "--smoke", f"--problem={problem}",
                  f"--optimizers={','.join(names)}", f"--output_dir={tmp_path}",
                  f"--grid={grid}")
    assert result.returncode == 0, result.stderr[-5000:]
    report = (tmp_path / f"benchmark_{problem}.md").read_text()
    assert report in result.stdout
    if "KFAC" in names:
        assert "| KFAC | step_control=trust_region, inverse_warmup=False |" in report
    for name in names:
        # In the convergence, cost and grid tables; TKFAC/KFAC also by kind of step.
        rows = len(re.findall(rf"^\| {name} \|", report, re.MULTILINE))
        assert rows == (4 if name in ("TKFAC", "KFAC") else 3), report
    runs = json.loads((tmp_path / f"benchmark_{problem}.json").read_text())
    assert [run["optimizer"] for run in runs] == names
    for run in runs:
        assert len(run["step_losses"]) == len(run["step_seconds"]) == 12
        assert all(math.isfinite(loss) for loss in run["step_losses"])
    assert (tmp_path / f"benchmark_{problem}.png").stat().st_size > 0


def test_step_costs_smoke(tmp_path):
    out = tmp_path / "costs.md"
    result = _run("tools/step_costs.py", "--smoke", "--problem=mlp",
                  f"--out={out}", '--configs={"TKFAC": {"conv_location_stride": 2}, '
                  '"TKFAC bf16": {"precondition_dtype": "bfloat16"}}')
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| TKFAC")]
    assert len(rows) == 2
    # The bfloat16 update is within the stated 1e-2..3e-2 of float32, and not equal.
    assert 0 < float(rows[1][-1].strip(" |")) < 0.1


@_ONE_MEASUREMENT_TOOL
def test_first_step_smoke():
    """`tools/first_step.py` times a one-step `fit` both ways; Keras's own build
    traces the curvature step twice, the build from shapes once; the curvature
    step's trace creates more graph operations than Adam's. `--applications` adds
    rows (a small convnet under `--smoke`)."""
    result = _run("tools/first_step.py", "--smoke", "--workloads=mlp", "--rounds=1",
                  "--applications=ResNet50V2")
    assert result.returncode == 0, result.stderr[-5000:]
    for name in ("mlp", "ResNet50V2"):
        rows = [line.split(" | ") for line in result.stdout.splitlines()
                if line.startswith(f"| {name} ")]
        assert len(rows) == 1, name
        assert [int(rows[0][4]), int(rows[0][6])] == [2, 1]
        assert float(rows[0][5]) > 0
        assert int(rows[0][7]) > int(rows[0][2]) > 0
    assert "--applications=ResNet50V2" in result.stdout


@_ONE_MEASUREMENT_TOOL
def test_correlated_batches_smoke():
    """`tools/correlated_batches.py` trains keras-io's weather program, unshuffled
    and shuffled, and reports finite losses for every epoch."""
    result = _run("tools/correlated_batches.py", "--rows=6000", "--epochs=1",
                  '--runs={"Adam": null, "TKFAC": {}}')
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith(("| Adam |", "| TKFAC |"))]
    assert [row[1] for row in rows] == ["no", "no", "yes", "yes"] * 2
    for row in rows:
        values = [float(v) for part in row[2:4] for v in part.split(" / ")]
        assert len(values) == 2 and all(math.isfinite(v) for v in values)
        assert math.isfinite(float(row[4])) and math.isfinite(float(row[5]))


@_ONE_MEASUREMENT_TOOL
@pytest.mark.parametrize("heads", ["1", "2"])
def test_regression_scales_smoke(heads):
    """`tools/regression_scales.py --smoke` trains one MLP (with `--heads=2`, and a
    class head) on targets of scale 1 and 25 with Adam, `TKFAC()` and the previous
    KL bound, and reports finite ratios (and cross-entropies)."""
    result = _run("tools/regression_scales.py", "--smoke", f"--heads={heads}",
                  "--adam=1e-3,3e-3")
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.splitlines()
    table = max(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert "| Adam(1e-3) | Adam(3e-3) | TKFAC() |" in lines[table]
    rows = [line.split(" | ") for line in lines[table:]
            if line.startswith("| 64-64:relu |")]
    assert [row[1] for row in rows] == ["1", "25"]
    for row in rows:
        cells = [cell.strip(" |") for cell in row[2:]]
        assert len(cells) == 4
        for cell in cells:
            values = cell.replace("(", "").replace(")", "").replace("/", "").split()
            assert len(values) == int(heads) + 1
            assert all(math.isfinite(float(v)) for v in values)


@_ONE_MEASUREMENT_TOOL
def test_weighted_losses_smoke():
    """`tools/weighted_losses.py --smoke` trains the digits classifier at two loss
    scales (weighted two ways), the Dice program on two seeds and the MAE program on
    one, and reports finite losses and collapse counts; bad flags are refused naming
    them."""
    result = _run("tools/weighted_losses.py", "--smoke")
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.splitlines()
    # (Each row is printed as it is measured, then the whole table.)
    lines = lines[max(i for i, line in enumerate(lines) if line.startswith(
        "| scale |")):]
    scales = [line.split(" | ") for line in lines if line.startswith(("| 1 |", "| 10 |"))]
    assert [(row[0], row[1]) for row in scales] == [
        ("| 1", "sample_weight"), ("| 1", "loss_weights"),
        ("| 10", "sample_weight"), ("| 10", "loss_weights")]
    for row in scales:
        values = [float(cell.strip(" |")) for cell in row[2:]]
        assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values)
    dice_at = next(i for i, line in enumerate(lines) if line.endswith("| collapsed |"))
    mae_at = next(i for i, line in enumerate(lines) if line.endswith("| mean |"))
    dice = [line.split(" | ") for line in lines[dice_at:mae_at]
            if line.startswith(("| TKFAC()", "| Adam(1e-2)"))]
    assert len(dice) == 4
    for row in dice:
        values = [float(cell.strip(" |")) for cell in row[1:]]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
        assert values[2] == sum(v > 0.3 for v in values[:2])
    mae = [line.split(" | ") for line in lines[mae_at:]
           if line.startswith(("| TKFAC", "| Adam"))]
    assert len(mae) == 5
    for row in mae:
        values = [float(cell.strip(" |")) for cell in row[1:]]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    for flag in ("--parts=scales,nope", "--scales=0", "--seeds=0", "--mae_seeds=0"):
        result = _run("tools/weighted_losses.py", flag, "--smoke")
        assert result.returncode != 0 and flag.split("=")[0] in result.stderr


@_ONE_MEASUREMENT_TOOL
def test_robust_losses_smoke():
    """`tools/robust_losses.py --smoke` trains two Huber programs with Adam,
    `TKFAC()` and `TKFAC(fisher="empirical")` and reports finite losses and ratios;
    an unknown program is refused naming it."""
    result = _run("tools/robust_losses.py", "--smoke", "--adam=1e-3")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith(("| huber_mlp |", "| huber_outliers |"))]
    assert [row[0].strip("| ") for row in rows] == ["huber_mlp", "huber_outliers"]
    for row in rows:
        values = [float(cell.strip(" |")) for cell in row[2:]]
        assert len(values) == 5 and all(math.isfinite(v) and v > 0 for v in values)
    result = _run("tools/robust_losses.py", "--programs=huber_mlp,nope", "--smoke")
    assert result.returncode != 0 and "'nope'" in result.stderr
    # A Poisson program reports its loss less the perfect prediction's (half the
    # mean deviance): positive, where Keras's Poisson loss itself can be negative.
    result = _run("tools/robust_losses.py", "--programs=poisson_counts", "--smoke",
                  "--adam=1e-3")
    assert result.returncode == 0, result.stderr[-5000:]
    row = [line.split(" | ") for line in result.stdout.splitlines()
           if line.startswith("| poisson_counts |")][0]
    values = [float(cell.strip(" |")) for cell in row[2:]]
    assert len(values) == 5 and all(math.isfinite(v) and v > 0 for v in values)


@_ONE_MEASUREMENT_TOOL
def test_small_data_smoke():
    """`tools/small_data.py --smoke` trains the structured-data program with Adam,
    `TKFAC()` and `TKFAC()` with early stopping and reports finite losses; unknown
    programs and non-positive epochs are refused naming them."""
    result = _run("tools/small_data.py", "--smoke", "--adam=1e-3")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| structured |")]
    assert len(rows) == 1 and len(rows[0]) == 6
    for cell in rows[0][2:]:
        numbers = re.findall(r"[-+0-9.e]+", cell.replace("epochs", ""))
        values = [float(v) for v in numbers]
        assert all(math.isfinite(v) for v in values) and values[0] <= values[2] + 1e-6
    result = _run("tools/small_data.py", "--programs=structured,nope", "--smoke")
    assert result.returncode != 0 and "'nope'" in result.stderr
    result = _run("tools/small_data.py", "--epochs=0")
    assert result.returncode != 0 and "--epochs" in result.stderr


@_ONE_MEASUREMENT_TOOL
def test_model_churn_smoke():
    """`tools/model_churn.py` trains and drops models in a process per optimizer and
    finds none of them alive at the end."""
    result = _run("tools/model_churn.py", "--models=7")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith(("| Adam |", "| TKFAC |"))]
    assert len(rows) == 2
    for row in rows:
        assert row[-1].strip(" |") == "0 of 7"


@_ONE_MEASUREMENT_TOOL
def test_unknown_batch_smoke():
    """`tools/unknown_batch.py --smoke` times both configurations, each in its own
    process: before the forward-mode rules the products take one pass per direction,
    after them one nested pass."""
    result = _run("tools/unknown_batch.py", "--smoke")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith(("| before |", "| after |"))]
    assert [row[1] for row in rows] == ["one pass per direction", "one nested pass"]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3].strip(" |")) > 0


def test_fisher_report_smoke(tmp_path):
    result = _run("tools/fisher_report.py", "--smoke", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in
            (tmp_path / "fisher_report_mlp.md").read_text().splitlines()
            if re.match(r"\| \d+ \| dense", line)]
    assert len(rows) == 6, rows  # three Dense layers at two steps
    for row in rows:
        tkfac_error, kfac_error = float(row[3]), float(row[4])
        assert 0 <= tkfac_error < 1 and 0 <= kfac_error < 1
        # TKFAC keeps the trace of a dense layer's Fisher block exactly.
        assert float(row[6]) == pytest.approx(1, abs=1e-3)
    assert (tmp_path / "fisher_report_mlp.png").stat().st_size > 0


@pytest.mark.slow
def test_recurrent_costs_smoke(tmp_path):
    out = tmp_path / "costs.md"
    result = _run("tools/recurrent_costs.py", "--smoke", f"--out={out}")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in
            out.read_text().splitlines() if line.startswith("| TKFAC")}
    # The embedding and the head, then also the four LSTMs of the two Bidirectionals.
    assert int(rows["| TKFAC"][1]) == 2
    assert int(rows["| TKFAC recurrent"][1]) == 6


@_ONE_MEASUREMENT_TOOL
def test_separable_smoke():
    """`tools/separable.py --smoke` trains each configuration one epoch; the
    "on the fallback" one really leaves the pointwise kernels to the fallback."""
    result = _run("tools/separable.py", "--smoke", "--programs=series")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| series |")]
    assert [row[1] for row in rows] == [
        "Adam(1e-3)", "Adam(3e-3)", "TKFAC() separable on the fallback", "TKFAC()"]
    for row in rows:
        assert all(math.isfinite(float(cell.strip(" |"))) for cell in row[2:])
    fallbacks = [line for line in result.stderr.splitlines()
                 if "take the first-order fallback" in line]
    assert len(fallbacks) == 2, fallbacks
    assert "pointwise_kernel" in fallbacks[0]
    assert "pointwise_kernel" not in fallbacks[1]
    assert "depthwise_kernel" in fallbacks[1]


@_ONE_MEASUREMENT_TOOL
def test_program_steps_interleaved_smoke():
    """`tools/program_steps.py --interleave` builds each configuration in one
    process and times their steps in turn; the products' tangents by TensorFlow's
    dispatch or inline (`inline_jvps`) train alike."""
    result = _run("tools/program_steps.py", "--program=squeeze_excitation",
                  "--steps=3", "--interleave",
                  '--configs={"TKFAC dispatch": {"inline_jvps": false}, '
                  '"TKFAC": {}, "Adam": {}}')
    assert result.returncode == 0, result.stderr[-5000:]
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines()
             if "median step" in line}
    assert list(lines) == ["TKFAC dispatch", "TKFAC", "Adam"]
    assert "1.000 x TKFAC dispatch" in lines["TKFAC dispatch"]
    losses = {name: float(line.split("last loss ")[1]) for name, line in lines.items()}
    assert losses["TKFAC"] == pytest.approx(losses["TKFAC dispatch"], rel=1e-4)
    assert all(math.isfinite(v) for v in losses.values())


@_ONE_MEASUREMENT_TOOL
def test_spectra_smoke():
    """`tools/spectra.py --smoke` reads the damped factors after a few steps: the
    rank-k form is exact where both factors have at most k dimensions, and every
    figure is finite."""
    result = _run("tools/spectra.py", "--smoke", "--workloads=mlp,resnet")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines()
            if line.startswith("| ") and " × " in line and "d_in" not in line]
    assert len(rows) > 4
    for row in rows:
        d_in, d_out = (int(d) for d in row[1].split(" × "))
        errors = [float(e) for e in row[5:10]]
        assert all(math.isfinite(e) and e >= 0 for e in errors)
        if max(d_in, d_out) <= 128:
            assert errors[-1] == 0.0
    assert "Dense layers' preconditioning flops" in result.stdout


@_ONE_MEASUREMENT_TOOL
@pytest.mark.parametrize("variant", ["zero_tangents", "sliced_finiteness",
                                     "embedding_rows", "unit_scale", "bfloat16",
                                     "auto_precision"])
def test_step_variants_smoke(variant):
    """`tools/step_variants.py --smoke`: both tracings of each workload train to the
    same loss (the changes compute the same step; `bfloat16` to bfloat16's rounding
    of the curvature products, `tests/test_precision.py`)."""
    result = _run("tools/step_variants.py", "--smoke", f"--variant={variant}",
                  "--workloads=mlp,transformer")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith(("| mlp |", "| transformer |"))]
    assert len(rows) == 2
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0
        assert math.isclose(float(row[4]), float(row[5].strip(" |")),
                            rel_tol=1e-2 if variant == "bfloat16" else 1e-4)


@_ONE_MEASUREMENT_TOOL
@pytest.mark.parametrize("variant", ["bound_elementwise", "bound_one_direction",
                                     "bound_split_directions"])
def test_step_variants_smoke_bounds(variant):
    """`tools/step_variants.py --smoke` with a bound (a piece of the step left out):
    both tracings train to finite losses."""
    result = _run("tools/step_variants.py", "--smoke", f"--variant={variant}",
                  "--workloads=mlp")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| mlp |")]
    assert len(rows) == 1
    assert float(rows[0][1]) > 0 and float(rows[0][2]) > 0
    assert all(math.isfinite(float(v.strip(" |"))) for v in rows[0][4:6])


@_ONE_MEASUREMENT_TOOL
def test_grouped_convs_smoke():
    """`tools/grouped_convs.py --smoke`: the native convolution equals Keras's to
    float rounding, and both programs train under Adam and under TKFAC with Keras's
    XLA convolutions and with the native ones, to finite losses."""
    result = _run("tools/grouped_convs.py", "--smoke", "--programs=convnext,resnext")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [[cell.strip() for cell in line.strip(" |").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| ")]
    shapes = [row for row in rows if row[0].startswith("32,")]
    assert len(shapes) == 1 and float(shapes[0][4]) < 1e-4
    programs = {row[0]: row for row in rows if row[0] in ("convnext", "resnext")}
    assert sorted(programs) == ["convnext", "resnext"]
    for row in programs.values():
        assert all(float(cell.split()[0]) > 0 for cell in row[1:4])
        assert all(math.isfinite(float(v)) for v in row[4].split(" / "))


@_ONE_MEASUREMENT_TOOL
def test_factored_convs_smoke():
    """`tools/factored_convs.py --smoke`: a convnet whose second convolution has few
    rows trains under Adam and TKFAC in both forms; the factored form's flops are
    below the full form's and its first step equals the full form's to float
    rounding."""
    result = _run("tools/factored_convs.py", "--smoke")
    assert result.returncode == 0, result.stderr[-5000:]
    (row,) = [[cell.strip() for cell in line.strip(" |").split("|")]
              for line in result.stdout.splitlines() if line.startswith("| smoke")]
    full, auto, passes = (float(cell) for cell in row[1:4])
    assert 0 < auto < full and passes > 0
    assert all(float(cell.split()[0]) > 0 for cell in row[4:7])
    assert float(row[7]) < 1e-5


@_ONE_MEASUREMENT_TOOL
def test_step_variants_smoke_location_stride():
    """`tools/step_variants.py --smoke --variant=location_stride`: the convnet with
    every location's statistics and with every second location's trains to finite
    losses (the statistics differ, so the losses do)."""
    result = _run("tools/step_variants.py", "--smoke", "--variant=location_stride",
                  "--workloads=convnet")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| convnet |")]
    assert len(rows) == 1
    assert float(rows[0][1]) > 0 and float(rows[0][2]) > 0
    assert all(math.isfinite(float(v.strip(" |"))) for v in rows[0][4:6])


@_ONE_MEASUREMENT_TOOL
def test_step_variants_smoke_unrolled_forward_mode():
    """`tools/step_variants.py --smoke --variant=unrolled_forward_mode`: the BiLSTM
    with Keras's unrolled loops trains to the same loss with reverse-over-reverse
    products and with forward mode through the loops."""
    result = _run("tools/step_variants.py", "--smoke", "--variant=unrolled_forward_mode",
                  "--workloads=lstm")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| lstm |")]
    assert len(rows) == 1
    assert float(rows[0][1]) > 0 and float(rows[0][2]) > 0
    assert math.isclose(float(rows[0][4]), float(rows[0][5].strip(" |")), rel_tol=1e-4)


@_ONE_MEASUREMENT_TOOL
def test_rounding_spread_smoke():
    """`tools/rounding_spread.py --smoke`: each perturbed run's row and the summary."""
    result = _run("tools/rounding_spread.py", "--smoke", "--workloads=mlp",
                  "--perturbations=2")
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 2
    assert all(math.isfinite(float(row.split(" | ")[4].strip(" |"))) for row in rows)
    assert "mlp: steps to target median" in result.stdout
