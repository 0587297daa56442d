"""Test-session set-up: two logical CPU devices for the MirroredStrategy tests, and
float32 for `"auto"` precision.

Logical devices must be configured before TensorFlow initialises its devices, so this
runs when pytest imports the conftest, before any test module. TensorFlow supports one
MirroredStrategy over CPUs per process (collective keys restart with each strategy),
so all tests share the `mirrored` fixture's strategy.
"""

import os

import pytest
import tensorflow as tf

# `"auto"` precision (`keras_tkfac.precision`) means float32 here, so that the float32
# oracles hold on machines with bfloat16 units too; `tests/test_precision.py` tests
# what `"auto"` resolves to, and the bfloat16 paths, explicitly. (Subprocesses of the
# tests inherit it.)
os.environ.setdefault("KERAS_TKFAC_AUTO_PRECISION", "float32")

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(scope="session")
def mirrored():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
