"""When statistics and inverses are recomputed."""

import numpy as np
import pytest
import keras

import keras_tkfac
from keras_tkfac import cadence
from tests import helpers


@pytest.mark.parametrize(
    "t_cov, t_inv, warmup, expected",
    [
        (10, 100, False, [0, 100, 200]),
        (10, 100, True, [0, 10, 20, 40, 80, 100, 200]),
        (1, 20, True, [0, 1, 2, 4, 8, 16, 20, 40]),
        (5, 5, True, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]),
        (3, 50, True, [0, 3, 6, 12, 24, 48, 50, 100, 150, 200]),
    ],
)
def test_inverse_steps(t_cov, t_inv, warmup, expected):
    steps = [k for k in range(min(201, 10 * t_inv + 1))
             if bool(cadence.inverse_due(k, t_cov, t_inv, warmup))]
    assert steps[:len(expected)] == expected


def test_optimizer_inverts_at_the_warmup_steps():
    """The inverses change exactly at the steps `inverse_due` names."""
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(factor_update_freq=1, inverse_update_freq=10,
                                  inverse_warmup=True, fisher="empirical")
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    changed = []
    previous = None
    for step in range(12):
        model.train_on_batch(x, y)
        current = optimizer._slots[0].inverses[0].numpy().copy()
        if previous is not None and not np.array_equal(current, previous):
            changed.append(step)
        previous = current
    assert changed == [1, 2, 4, 8, 10]
