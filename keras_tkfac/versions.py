"""Which TensorFlow and Keras keras_tkfac runs on, checked once at import.

keras_tkfac records layer inputs and output gradients with `tf.GradientTape` and
builds its steps from TensorFlow ops, so it needs Keras's TensorFlow backend: any
other backend raises `ImportError` at `import keras_tkfac`, naming it.

The oldest versions the test suite was run on (`make test`'s tests, 2026-12-07):

- TensorFlow 2.19.1 with Keras 3.10.0: 1237 tests pass; three skip there, which use
  what that Keras lacks or rejects (`BatchNormalization(renorm=...)`, a transposed
  convolution's `output_padding` of 0) or a trajectory of Keras 3.15's random
  draws; the tools' smoke tests leave out its `Muon`, which raises in `fit` on
  TensorFlow.
- TensorFlow 2.18.1 with Keras 3.8.0 (the tests that failed on 3.5, run again): a
  `mixed_float16` run under the default step control ended at twice the float32
  run's loss, which the test bounds at 5% (not investigated), and `RematScope`,
  `Muon` and `lora_alpha` do not exist there.
- TensorFlow 2.16.2 with Keras 3.5.0: 81 of 1226 failed (2 more errored), among
  them two replicas of `MirroredStrategy` no longer matching one device under the
  default step control, and a model's own `compute_loss` not reached.

So `setup.cfg` requires Keras 3.10 and (through its extras) TensorFlow 2.19, and an
older one found at import is logged once, with this module's name, rather than
refused: a program may still run there.
"""

from absl import logging
import tensorflow as tf
import keras

# The oldest versions every test passes on (but the version-gated ones, above).
MINIMUM = {"tensorflow": (2, 19), "keras": (3, 10)}


def _major_minor(version):
    """`(major, minor)` of a version string such as `"2.19.1"` or `"3.11.0.dev0"`."""
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (2 - len(parts)))


def check(backend=None, versions=None):
    """Raises `ImportError` unless Keras runs on TensorFlow; logs a warning where
    TensorFlow or Keras is older than `MINIMUM`.

    Args:
        backend: the Keras backend's name (default: `keras.config.backend()`).
        versions: `{"tensorflow": ..., "keras": ...}` version strings (default:
            the installed ones).

    Returns:
        The names of the packages older than `MINIMUM` (empty if none).
    """
    backend = keras.config.backend() if backend is None else backend
    if backend != "tensorflow":
        raise ImportError(
            "keras_tkfac needs Keras's TensorFlow backend (it records gradients with "
            "tf.GradientTape); set the environment variable KERAS_BACKEND=tensorflow "
            f"before importing keras. Received: backend={backend!r}")
    if versions is None:
        versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    old = [name for name, version in versions.items()
           if _major_minor(version) < MINIMUM[name]]
    if old:
        logging.warning(
            "keras_tkfac is tested with TensorFlow >= %s and Keras >= %s; found %s. "
            "Some features may fail here (keras_tkfac.versions lists what failed on "
            "older versions).",
            ".".join(map(str, MINIMUM["tensorflow"])),
            ".".join(map(str, MINIMUM["keras"])),
            ", ".join(f"{name} {versions[name]}" for name in old))
    return old
