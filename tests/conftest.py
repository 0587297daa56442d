"""Test-session set-up: two logical CPU devices for the MirroredStrategy tests.

Logical devices must be configured before TensorFlow initialises its devices, so this
runs when pytest imports the conftest, before any test module. TensorFlow supports one
MirroredStrategy over CPUs per process (collective keys restart with each strategy),
so all tests share the `mirrored` fixture's strategy.
"""

import pytest
import tensorflow as tf

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(scope="session")
def mirrored():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
