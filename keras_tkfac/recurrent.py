"""Curvature blocks of recurrent layers: `SimpleRNN`, `LSTM` and `GRU`.

A recurrent layer applies the same weights at every time step. Following the
simplest approximation of Martens, Ba & Johnson (2018), time steps are treated as
extra rows, as a `Dense` layer applied to a sequence is: a row is one (example,
time step) pair, and the Fisher block of the layer's weights is Kronecker-factored
over all rows.

Recording inside the layer's loop is impossible (its tensors live in the loop's
graph), so on a recorded call the block runs the layer itself, outside-in: the
gates' input projections `z_x = x W + b` of every time step are computed *before*
the loop and recorded as `s`, and a `tf.scan` over time applies the cell's
recurrence to them. Because the gates' pre-activations are `z_t = z_x[t] + h_{t-1} U`,
the gradient of the loss with respect to `z_x[t]` is the gradient with respect to
`z_t`: one backward pass gives the `g` of every time step, for the kernel and the
recurrent kernel alike. The loop also returns each step's recurrent input
`h_{t-1}`, recorded in `a`. Calls outside a recording run the layer's own `call`
unchanged (cuDNN included).

- `SimpleRNN`, `LSTM`: `z_t = [x_t, h_{t-1}, 1] [W; U; b]`, one block with the
  input row `[x_t, h_{t-1}, 1]` (as a fully connected layer on the concatenated
  input, the form of TensorFlow 1's LSTM cell).
- `GRU` (`reset_after=True`, Keras's default): the candidate gate's recurrent
  term is `r ⊙ (h_{t-1} U_h + b_rh)`, so the recurrent part sees the output
  gradient `g ⊙ [1, 1, r]` while the input part sees `g`. The block is grouped:
  group 0 is `[x_t, 1] -> [W; b_in]`, group 1 `[h_{t-1}, 1] -> [U; b_rec]`, each
  zero-padded to the larger of the two input widths (a padded row is zero in the
  factor and in the gradient, so it changes nothing but the factor's dimension).

Declined configurations take the first-order fallback: `stateful=True`, per-gate
dropout masks (`implementation=1` with dropout, which `recurrent_dropout` forces
for `LSTM` and `GRU`), `GRU(reset_after=False)` (its recurrent input `r ⊙ h`
differs between gates) and any `keras.layers.RNN` whose cell is not one of these
three.

References:
- [Martens, Ba & Johnson, 2018. Kronecker-factored curvature approximations for
  recurrent neural networks](https://openreview.net/forum?id=HyMTkQZAb)
"""

import inspect

import tensorflow as tf
import keras

from keras_tkfac import blocks


def _cell(layer):
    return layer.cell


class RecurrentBlock(blocks.CurvatureBlock):
    """Base of the recurrent blocks: runs the layer's recurrence on recorded calls.

    Subclasses give `gates` (gate blocks of `units` columns in the kernel),
    `step(z_x, states, rec_mask)` (one cell step from the input projection; returns
    the output, the new states and the recorded extras of this step) and `rows`.
    """

    gates = 1
    extras = 1  # tensors of `[batch, units]` per step that `rows` needs
    # The input row `[x_t, h_{t-1}, 1]` holds a constant 1 beside small inputs and
    # states, so the bias row of the preconditioned update outweighs the rest; grafted
    # as one, it took most of the layer's RMSProp length (bias steps 10x Adam's on the
    # suite's BiLSTM, where training then stalled at chance for 30 steps).
    # Each of the kernel, the recurrent kernel and the bias gets its own length
    # (docs/RESULTS.md, "Recurrent layers: each variable its own step length").
    graft_per_variable = True

    @classmethod
    def accepts(cls, layer):
        cell = _cell(layer)
        if getattr(layer, "stateful", False) or type(cell) is not cls.cell_class:
            return False
        per_gate_masks = getattr(cell, "implementation", 2) == 1 and (
            cell.dropout > 0 or cell.recurrent_dropout > 0)
        return not per_gate_masks

    @property
    def units(self):
        return int(_cell(self.layer).units)

    @property
    def kernel(self):
        return _cell(self.layer).kernel

    @property
    def recurrent_kernel(self):
        return _cell(self.layer).recurrent_kernel

    @property
    def bias(self):
        cell = _cell(self.layer)
        return cell.bias if cell.use_bias else None

    @property
    def variables(self):
        return [v for v in (self.kernel, self.recurrent_kernel, self.bias)
                if v is not None]

    @property
    def input_dim(self):
        return int(self.kernel.shape[0])

    def preactivation(self, inputs):
        raise NotImplementedError(
            "A recurrent layer's output is not a function of one projection; "
            "use `record_call`.")

    def input_projection(self, x):
        """`x W (+ b_in)` for every time step: `[batch, time, gates * units]`."""
        z = keras.ops.matmul(x, self.kernel)
        bias = self.input_bias()
        return z if bias is None else z + bias

    def input_bias(self):
        return self.bias

    def step(self, z_x, states, rec_mask):
        raise NotImplementedError

    def record_call(self, call, inputs, *args, **kwargs):
        arguments = inspect.signature(call).bind(inputs, *args, **kwargs).arguments
        layer, cell = self.layer, _cell(self.layer)
        training = arguments.get("training")
        mask = arguments.get("mask")
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        x = tf.convert_to_tensor(inputs)
        x = tf.cast(x, layer.compute_dtype)
        states = arguments.get("initial_state")
        if states is None:
            states = layer.get_initial_state(batch_size=tf.shape(x)[0])
        if not isinstance(states, (list, tuple)):
            states = [states]
        states = [tf.cast(s, layer.compute_dtype) for s in states]

        rec_mask = None
        if training and cell.dropout > 0:
            x = x * tf.expand_dims(cell.get_dropout_mask(x[:, 0, :]), 1)
        if training and getattr(cell, "recurrent_dropout", 0) > 0:
            rec_mask = cell.get_recurrent_dropout_mask(states[0])
        cell.reset_dropout_mask()
        cell.reset_recurrent_dropout_mask()

        z_x = self.input_projection(x)
        outputs, new_states, extras = self._scan(
            z_x, states, rec_mask, mask, layer.go_backwards,
            getattr(layer, "zero_output_for_mask", False),
        )
        if layer.go_backwards:
            # Rows pair `z_x[t]` (input order) with the step that consumed it.
            extras = [tf.reverse(e, [1]) for e in extras]
        # Masked time steps give zero rows (their `g` is zero already).
        keep = (tf.ones_like(x[:, :, :1]) if mask is None
                else tf.cast(mask, x.dtype)[:, :, None])
        output = outputs if layer.return_sequences else outputs[:, -1]
        result = (output, *new_states) if layer.return_state else output
        return (keep, x, *extras), z_x, result

    def _scan(self, z_x, states, rec_mask, mask, go_backwards, zero_output):
        """The recurrence over time, as Keras's `backend.rnn` runs it.

        Returns `(outputs [batch, time, units], final states, extras)`, outputs in
        processing order (reversed for `go_backwards`, as Keras returns them).
        """
        sequence = [tf.transpose(z_x, [1, 0, 2])]
        if mask is not None:
            sequence.append(tf.transpose(tf.cast(mask, tf.bool)))
        if go_backwards:
            sequence = [tf.reverse(s, [0]) for s in sequence]
        output_zeros = tf.zeros_like(states[0])

        def body(carry, inputs):
            previous_output, previous_states = carry[0], carry[1]
            output, new_states, extras = self.step(inputs[0], previous_states,
                                                   rec_mask)
            if mask is not None:
                keep = inputs[1][:, None]
                new_states = [tf.where(keep, new, old)
                              for new, old in zip(new_states, previous_states)]
                fallback = output_zeros if zero_output else previous_output
                output = tf.where(keep, output, fallback)
            return output, new_states, extras

        initial = (output_zeros, list(states), [output_zeros] * self.extras)
        outputs, final_states, extras = tf.scan(body, tuple(sequence), initial)
        final_states = [s[-1] for s in final_states]
        return (tf.transpose(outputs, [1, 0, 2]), final_states,
                [tf.transpose(e, [1, 0, 2]) for e in extras])

    def _recurrent_input(self, h, rec_mask):
        return h if rec_mask is None else h * rec_mask


class _JointBlock(RecurrentBlock):
    """`z_t = [x_t, h_{t-1}, 1] [W; U; b]`: one block on the concatenated input."""

    def kernel_rows(self):
        return self.input_dim + self.units

    def rows(self, inputs, output_grads):
        a, g = self.sequence_rows(inputs, output_grads)
        return (tf.reshape(a, [-1, a.shape[-1]]), tf.reshape(g, [-1, self.d_out]))

    def sequence_rows(self, inputs, output_grads):
        """`([batch, time, d_in'], [batch, time, d_out])`: the rows of each sequence."""
        keep, x, h_prev = inputs
        a = self._with_bias(tf.concat([x, tf.cast(h_prev, x.dtype)], axis=-1))
        return a * keep, tf.ensure_shape(output_grads, [None, None, self.d_out])

    def grad_matrix(self, kernel_grad, recurrent_grad, bias_grad=None):
        parts = [tf.convert_to_tensor(kernel_grad), tf.convert_to_tensor(recurrent_grad)]
        if bias_grad is not None:
            parts.append(tf.reshape(bias_grad, [1, self.d_out]))
        return tf.concat(parts, axis=0)

    def split_matrix(self, matrix):
        d = self.input_dim
        kernel = tf.reshape(matrix[:d], self.kernel.shape)
        recurrent = tf.reshape(matrix[d:d + self.units], self.recurrent_kernel.shape)
        bias = None if self.bias is None else tf.reshape(matrix[-1], self.bias.shape)
        return kernel, recurrent, bias


class SimpleRNNBlock(_JointBlock):
    """`keras.layers.SimpleRNN`: `h_t = act(x_t W + h_{t-1} U + b)`."""

    cell_class = keras.layers.SimpleRNNCell

    def step(self, z_x, states, rec_mask):
        h_prev = self._recurrent_input(states[0], rec_mask)
        z = z_x + keras.ops.matmul(h_prev, self.recurrent_kernel)
        activation = _cell(self.layer).activation
        h = z if activation is None else activation(z)
        return h, [h], [h_prev]


class LSTMBlock(_JointBlock):
    """`keras.layers.LSTM` (gates `i, f, c, o`; `recurrent_dropout` is declined,
    since Keras then uses per-gate masks)."""

    cell_class = keras.layers.LSTMCell
    gates = 4

    def step(self, z_x, states, rec_mask):
        cell = _cell(self.layer)
        h_prev, c_prev = states
        z = z_x + keras.ops.matmul(h_prev, self.recurrent_kernel)
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
        i = cell.recurrent_activation(z_i)
        f = cell.recurrent_activation(z_f)
        c = f * c_prev + i * cell.activation(z_c)
        o = cell.recurrent_activation(z_o)
        h = o * cell.activation(c)
        return h, [h, c], [h_prev]


class GRUBlock(RecurrentBlock):
    """`keras.layers.GRU` with `reset_after=True` (Keras's default): two groups,
    the input part `[x_t, 1]` and the recurrent part `[h_{t-1}, 1]`."""

    cell_class = keras.layers.GRUCell
    gates = 3
    extras = 2  # h_{t-1} and the reset gate r
    groups = 2

    @classmethod
    def accepts(cls, layer):
        return super().accepts(layer) and bool(_cell(layer).reset_after)

    def kernel_rows(self):
        return max(self.input_dim, self.units)

    def input_bias(self):
        return None if self.bias is None else self.bias[0]

    def step(self, z_x, states, rec_mask):
        cell = _cell(self.layer)
        h_prev = states[0]
        inner = keras.ops.matmul(h_prev, self.recurrent_kernel)
        if self.bias is not None:
            inner = inner + self.bias[1]
        x_z, x_r, x_h = tf.split(z_x, 3, axis=-1)
        rec_z, rec_r, rec_h = tf.split(inner, 3, axis=-1)
        z = cell.recurrent_activation(x_z + rec_z)
        r = cell.recurrent_activation(x_r + rec_r)
        hh = cell.activation(x_h + r * rec_h)
        h = z * h_prev + (1 - z) * hh
        return h, [h], [h_prev, r]

    def _pad(self, a, width):
        """`[..., width]` rows padded with zeros to `kernel_rows()` (+ the ones)."""
        padding = [[0, 0]] * (a.shape.rank - 1) + [[0, self.kernel_rows() - width]]
        return self._with_bias(tf.pad(a, padding))

    def rows(self, inputs, output_grads):
        a, g = self.sequence_rows(inputs, output_grads)
        return (tf.reshape(a, [-1, 2, a.shape[-1]]), tf.reshape(g, [-1, 2, self.d_out]))

    def sequence_rows(self, inputs, output_grads):
        """`([batch, time, 2, d_in'], [batch, time, 2, d_out])`: each sequence's
        rows of the two groups."""
        keep, x, h_prev, r = inputs
        g = tf.ensure_shape(output_grads, [None, None, self.d_out])
        ones = tf.ones_like(r)
        g_rec = g * tf.cast(tf.concat([ones, ones, r], axis=-1), g.dtype)
        a = tf.stack([self._pad(x, self.input_dim),
                      self._pad(tf.cast(h_prev, x.dtype), self.units)], axis=2)
        return a * keep[..., None], tf.stack([g, g_rec], axis=2)

    def _group(self, weight_grad, rows, bias_grad):
        weight = tf.reshape(tf.convert_to_tensor(weight_grad), [rows, self.d_out])
        weight = tf.pad(weight, [[0, self.kernel_rows() - rows], [0, 0]])
        if bias_grad is None:
            return weight
        return tf.concat([weight, tf.reshape(bias_grad, [1, self.d_out])], axis=0)

    def grad_matrix(self, kernel_grad, recurrent_grad, bias_grad=None):
        bias = [None, None] if bias_grad is None else tf.unstack(
            tf.reshape(tf.convert_to_tensor(bias_grad), [2, self.d_out]))
        return tf.stack([self._group(kernel_grad, self.input_dim, bias[0]),
                         self._group(recurrent_grad, self.units, bias[1])])

    def split_matrix(self, matrix):
        kernel = matrix[0, :self.input_dim]
        recurrent = matrix[1, :self.units]
        bias = None
        if self.bias is not None:
            bias = tf.reshape(matrix[:, -1], self.bias.shape)
        return kernel, recurrent, bias


RECURRENT_BLOCKS = {
    keras.layers.SimpleRNN: SimpleRNNBlock,
    keras.layers.LSTM: LSTMBlock,
    keras.layers.GRU: GRUBlock,
}


class GenericRNNBlock(RecurrentBlock):
    """`keras.layers.RNN(cell)` whose cell is a `SimpleRNNCell`, `LSTMCell` or
    `GRUCell`: the cell's block, found at construction."""

    @classmethod
    def accepts(cls, layer):
        block_class = _CELL_BLOCKS.get(type(_cell(layer)))
        return block_class is not None and block_class.accepts(layer)

    def __new__(cls, layer):
        return _CELL_BLOCKS[type(_cell(layer))](layer)


_CELL_BLOCKS = {block.cell_class: block for block in RECURRENT_BLOCKS.values()}


def register_recurrent_blocks():
    """Registers the blocks of `SimpleRNN`, `LSTM`, `GRU` and `RNN` with one of
    their cells (off by default), for models wrapped from then on and for wrapped
    models whose optimizer is not built yet (a built one keeps its blocks; logged).

    Off by default because the default, recurrent layers on the Adam partner, did
    better where it matters most: on the workload suite's bidirectional-LSTM
    classifier TKFAC with the LSTMs preconditioned reached a best validation loss of
    0.043 (Adam's best 0.049), against 0.0196 on the partner, and over 304 steps of
    two token classifiers (`tools/held_out.py`) preconditioned recurrent layers fit
    the training sequences within 1-2 epochs and generalise worse (README,
    "Recurrent layers"; docs/RESULTS.md, "Recurrent layers: each variable its own
    step length").

    Example:

    ```python
    keras_tkfac.register_recurrent_blocks()
    model = keras_tkfac.wrap(build_model())
    ```
    """
    for layer_class, block_class in RECURRENT_BLOCKS.items():
        blocks.register_block(layer_class, block_class)
    blocks.register_block(keras.layers.RNN, GenericRNNBlock)
