"""Deep Q-learning with TKFAC in a custom loop (keras-io's DQN shape).

The loss is on a function of the network's output, not the output itself: the
Huber loss between the Bellman targets and `q_action = sum(q * one_hot(a))`, the
value of the action taken. `update_curvature` takes `y_pred=q_action`, and its
`forward` must compute the same tensor from the model (README, "Custom training
loops"): `lambda: tf.reduce_sum(model(s, training=True) * tf.one_hot(a, n), 1)`.
Huber's Fisher is sampled from its Hessian at the targets (README, "Losses").

The environment is made here, so nothing is downloaded: an `--size` x `--size` grid,
start in one corner, the goal (+1, the episode ends) in the opposite one, -0.01 a
step, episodes of at most `4 * size` steps; the state is the one-hot position.
Replay buffer, target network copied every `--target_every` steps, epsilon-greedy
exploration decaying from 1 to 0.1. Printed: the greedy policy's steps from the
start to the goal (`size - 1` twice is optimal; "not reached" if it loops) and the
mean loss of the last 100 updates.

    python examples/q_learning.py [--optimizer=tkfac|adam] [--steps=3000] [--smoke]
"""

import collections

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac

_OPTIMIZER = flags.DEFINE_enum("optimizer", "tkfac", ["tkfac", "adam"], "Optimizer.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "Learning rate (default: the optimizer's, 1e-3 for both).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Environment steps.")
_SIZE = flags.DEFINE_integer("size", 6, "The grid's side.")
_TARGET_EVERY = flags.DEFINE_integer("target_every", 100, "Steps between target copies.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, exploration and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "300 steps on a 4 x 4 grid.")

ACTIONS = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]])
GAMMA, BATCH, WARMUP = 0.95, 32, 200


class Grid:
    """Start at (0, 0), goal at (size - 1, size - 1)."""

    def __init__(self, size):
        self.size = size

    def reset(self):
        self.position, self.steps = np.zeros(2, int), 0
        return self.state()

    def state(self):
        state = np.zeros(self.size * self.size, "float32")
        state[self.position[0] * self.size + self.position[1]] = 1.0
        return state

    def step(self, action):
        self.position = np.clip(self.position + ACTIONS[action], 0, self.size - 1)
        self.steps += 1
        done = bool(np.all(self.position == self.size - 1))
        return (self.state(), 1.0 if done else -0.01,
                done or self.steps >= 4 * self.size, done)


def q_network(size):
    return keras.Sequential([keras.Input((size * size,)),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(len(ACTIONS))])


def greedy_steps(model, env):
    """Steps the greedy policy takes from the start to the goal, or None."""
    state = env.reset()
    for _ in range(4 * env.size):
        action = int(np.argmax(model(state[None], training=False)[0]))
        state, _, ended, reached = env.step(action)
        if reached:
            return env.steps
        if ended:
            return None
    return None


def main(argv):
    del argv
    size, steps = (4, 300) if _SMOKE.value else (_SIZE.value, _STEPS.value)
    rng = np.random.default_rng(_SEED.value)
    keras.utils.set_random_seed(_SEED.value)
    network, target = q_network(size), q_network(size)
    target.set_weights(network.get_weights())
    model = network
    kwargs = {} if _LEARNING_RATE.value is None else {
        "learning_rate": _LEARNING_RATE.value}
    huber = keras.losses.Huber()
    if _OPTIMIZER.value == "tkfac":
        model = keras_tkfac.wrap(network)
        optimizer = keras_tkfac.TKFAC(seed=_SEED.value, **kwargs)
    else:
        optimizer = keras.optimizers.Adam(**kwargs)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(states, actions, targets):
        chosen = tf.one_hot(actions, len(ACTIONS))
        with tf.GradientTape(persistent=True) as tape:
            if _OPTIMIZER.value == "tkfac":
                with keras_tkfac.record(model) as recording:
                    q = model(states, training=True)
            else:
                q = model(states, training=True)
            q_action = tf.reduce_sum(q * chosen, axis=1)
            loss = huber(targets, q_action)
        grads = tape.gradient(loss, model.trainable_variables)
        if _OPTIMIZER.value == "tkfac":
            # `forward` computes `q_action`, the tensor the loss is on, not `q`.
            optimizer.update_curvature(
                recording, tape, q_action, y_true=targets, loss=huber,
                forward=lambda: tf.reduce_sum(model(states, training=True) * chosen, 1))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    env, replay = Grid(size), collections.deque(maxlen=5000)
    state, losses, episodes = env.reset(), [], 0
    for step in range(steps):
        epsilon = max(0.1, 1.0 - 0.9 * step / (0.5 * steps))
        if rng.random() < epsilon:
            action = int(rng.integers(len(ACTIONS)))
        else:
            action = int(np.argmax(model(state[None], training=False)[0]))
        following, reward, ended, reached = env.step(action)
        replay.append((state, action, reward, following, float(reached)))
        state = env.reset() if ended else following
        episodes += ended
        if len(replay) >= WARMUP:
            picked = [replay[i] for i in rng.integers(len(replay), size=BATCH)]
            s, a, r, s2, terminal = (np.array(column) for column in zip(*picked))
            best_next = np.max(target(s2, training=False).numpy(), axis=1)
            targets = (r + GAMMA * (1.0 - terminal) * best_next).astype("float32")
            losses.append(float(train_step(s, a.astype("int32"), targets)))
        if step % _TARGET_EVERY.value == 0:
            target.set_weights(network.get_weights())
    found = greedy_steps(model, Grid(size))
    print(f"{_OPTIMIZER.value}: {steps} steps, {episodes} episodes; greedy policy "
          f"{'not reached' if found is None else f'{found} steps'} to the goal "
          f"(optimal {2 * (size - 1)}); mean loss of the last 100 updates "
          f"{np.mean(losses[-100:]):.2e}")


if __name__ == "__main__":
    app.run(main)
