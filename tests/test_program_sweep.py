"""`tools/program_sweep.py`: Keras programs that train with Adam train with
`wrap` + `TKFAC()` / `KFAC()` at their defaults (no error, finite losses)."""

import math
import sys

import pytest

from tests.test_examples import _ROOT

sys.path.insert(0, str(_ROOT / "tools"))
import program_sweep  # noqa: E402  pylint: disable=wrong-import-position


def _check(names, optimizers, steps):
    for name in names:
        result = program_sweep.run(name, steps, optimizers)
        for optimizer in ("Adam", *optimizers):
            entry = result[optimizer]
            assert entry["status"] == "ok", (name, optimizer, entry)
            assert math.isfinite(entry["first"]) and math.isfinite(entry["last"])


def test_programs_that_used_to_fail_train():
    # Labels of lower rank than the output, a loss without a sampling rule, a
    # model's own train_step that does not feed curvature, a sub-layer never called.
    _check(["siamese_shared", "regression_losses", "own_train_step",
            "gated_residual_network"], ["TKFAC"], 8)


def test_a_bilinear_decoder_trains_with_the_quadratic_step():
    # Forward mode dropped the bilinear resize's derivative: the products missed
    # the encoder and the default step diverged (727 -> 4212 over three epochs).
    result = program_sweep.run("deeplab_bilinear_decoder", 16, ["TKFAC"])
    entry = result["TKFAC"]
    assert entry["status"] == "ok" and entry["last"] < entry["first"] < 1.0
    assert not any("products failed" in m for m in entry["messages"])


@pytest.mark.slow
def test_every_program_trains_with_tkfac_and_kfac():
    _check(list(program_sweep.PROGRAMS), ["TKFAC", "KFAC"], 16)


def test_held_out_reports_validation_losses_of_both_optimizers():
    import held_out  # pylint: disable=import-outside-toplevel
    result = held_out.run("gru_classifier", 1)
    assert set(result) == {"Adam", "TKFAC"}
    for best, epoch, last, train in result.values():
        assert epoch == 1 and best == last
        assert all(math.isfinite(v) for v in (best, last, train))
    with pytest.raises(ValueError, match="--programs"):
        held_out.run("mlp", 1)


def test_a_validation_split_reports_held_out_losses_against_the_best_adam():
    # 256 examples, a quarter held out: 6 batches an epoch, 2 epochs for 12 steps.
    rates = (1e-3, 1e-2)
    result = program_sweep.run("gru_classifier", 12, ["TKFAC"], validation_split=0.25,
                               adam_rates=rates)
    for optimizer in ("Adam", "TKFAC"):
        entry = result[optimizer]
        assert entry["status"] == "ok", entry
        assert entry["best_validation"] <= entry["last_validation"]
        assert math.isfinite(entry["best_validation"])
    # "Adam" is the rate with the lower best validation loss.
    alone = [program_sweep.run("gru_classifier", 12, [], validation_split=0.25,
                               adam_rates=(rate,))["Adam"] for rate in rates]
    best = min(alone, key=lambda entry: entry["best_validation"])
    assert result["Adam"]["learning_rate"] == best["learning_rate"]
    # (Runs repeat to float rounding: TensorFlow's threaded reductions.)
    assert result["Adam"]["best_validation"] == pytest.approx(best["best_validation"],
                                                              rel=1e-4)
    assert program_sweep._at_most_adams([result], "TKFAC", True)[1] == 1
    # Without a split there is no validation loss to compare.
    plain = program_sweep.run("gru_classifier", 8, ["TKFAC"])
    assert "best_validation" not in plain["TKFAC"]
    assert program_sweep._at_most_adams([plain], "TKFAC", True) == (0, 0)
