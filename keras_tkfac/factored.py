"""Factored preconditioning: `U = (L^{-1} a^T)(g R^{-1})` from the batch's rows.

A dense layer's gradient matrix is a sum over the rows of the batch, `G = a^T g`
(`a` `[rows, d_in]`: the layer's inputs with the bias column; `g` `[rows, d_out]`: the
loss's gradients with respect to the layer's outputs). Preconditioning `G` costs
`2 d_in d_out (d_in + d_out)` flops; multiplying the rows first,
`(L^{-1} a^T)(g R^{-1})`, costs `2 rows (d_in^2 + d_out^2 + d_in d_out)`, fewer when
the rows are fewer than the widths: 37% fewer for the first layer of the benchmark's
MLP (785 x 512 at batch 256). `ops.precondition_factored_or_full` picks the cheaper
form per layer, when tracing (static batch size) or with a `tf.cond`.

A convolution has a row per example and output location, so the factored form
pays where the output is small against the layer's widths: the late stages of an
ImageNet architecture on small images (ResNet50 on 32x32 inputs at batch 64: the
preconditioned layers' flops 71 G -> 34 G a step, against 28 G for their forward
and backward passes; its step 4.05x -> 2.79x Adam's on 2 CPU cores,
`tools/factored_convs.py`), not at 224x224 (unchanged).

Both forms give the same update up to float rounding, but only where `G = a^T g`
holds for the gradient the optimizer receives. The rows are therefore used only:

- when they come from the backward pass that computed the gradients (`wrap`'s
  training step asks the tape for both at once; a custom loop may pass them to
  `update_curvature` as `loss_output_gradients`);
- for layers whose blocks have `exact_rows` (`Dense`, `EinsumDense`, the pointwise
  kernel of the separable convolutions, and since 2026-12-06 `Conv1D`/`Conv2D`/
  `Conv3D`, whose rows are (example, output location) pairs, `a` an im2col
  patch), ungrouped, with no kernel or bias regularizer (its gradient is not part
  of `a^T g`); a convolution (whose rows are built) by the flops when its number
  of rows is known when traced (`may_factor`), else by a run-time branch that
  builds its patches only where it takes the factored form (`LazyRows`);
- on one replica (under a strategy the gradient is summed over replicas);
- when the optimizer neither clips nor accumulates gradients;
- and, at run time, when `G r = a^T (g r)` along a fixed random direction `r`
  (`ops.rows_give_gradient`, Freivalds' test: `O(d_in d_out)` flops), which catches
  what the static rules cannot see: a kernel shared with another layer (tied
  weights), an `add_loss` on the kernel, a gradient changed between `tape.gradient`
  and `apply_gradients`. The full form is used for that step instead.

`precondition_form="full"` turns the factored form off.
"""

import tensorflow as tf

from keras_tkfac import distributed
from keras_tkfac import ops
from keras_tkfac import row_sparse

FORMS = ("auto", "full")


def _static_rows(block, calls):
    """The number of rows of `block`'s recorded calls, or `None` if not static.

    A convolution's rows are its (example, output location) pairs, counted on its
    output `s`; other blocks' on their inputs."""
    total = 0
    for inputs, outputs in calls:
        if block.is_conv:
            count, width = outputs.shape.num_elements(), block.d_out * block.groups
        else:
            count, width = inputs.shape.num_elements(), block.kernel_rows()
        if count is None:
            return None
        total += count // width
    return total


def exact(block):
    """Whether `block`'s rows give its gradient exactly: `G = a^T g`."""
    layer = block.layer
    if (not getattr(block, "exact_rows", False) or block.groups > 1
            or block.input_kind != "dense"):
        return False
    return all(getattr(layer, name, None) is None
               for name in block.regularizers)


def may_factor(block, rows):
    """Whether `block` may use the factored form: its rows give its gradient exactly
    and, for a known number of `rows` (`None` if unknown), save flops. A block
    that `builds_rows` (a convolution: im2col patches, built every step for the
    factored form) needs a known number: its rows are worth building only where
    the factored form is taken, and an unknown number would build every such
    layer's rows for a choice made at run time (`loss_rows` gives those a
    `LazyRows`, built inside that choice's branch)."""
    if rows is None:
        return exact(block) and not block.builds_rows
    return exact(block) and (
        ops.factored_precondition_flops(rows, block.d_in, block.d_out)
        < ops.full_precondition_flops(block.d_in, block.d_out))


def _optimizer_allows(optimizer):
    return not (
        optimizer.precondition_form == "full"
        or distributed.is_distributed()
        or optimizer.clipnorm or optimizer.clipvalue or optimizer.global_clipnorm
        or optimizer.gradient_accumulation_steps
    )


class LazyRows:
    """A layer's rows built only when `build()` is called: `count`, their number
    (an int64 scalar tensor, from the layer's outputs), and `build()`, which
    returns `(a, g)` as `loss_rows` gives them. For blocks that `builds_rows`
    with a number of rows unknown when traced: `ops.precondition_factored_or_full`
    builds them inside the run-time branch that takes the factored form."""

    def __init__(self, count, build):
        self.count, self.build = count, build


def _rows_per_example(block, calls):
    """The rows of one example of each of `block`'s calls, summed (a convolution's
    output locations), or `None` where not known when traced."""
    total = 0
    for _, outputs in calls:
        count = outputs.shape[1:].num_elements()
        if count is None:
            return None
        total += count // (block.d_out * block.groups)
    return total


def _run_time_rows(block, calls):
    """The number of rows of `block`'s recorded calls (a convolution's), at run
    time."""
    width = block.d_out * block.groups
    return tf.add_n([tf.size(outputs, out_type=tf.int64) // width
                     for _, outputs in calls])


def loss_rows(optimizer, blocks, recording, output_grads, scale):
    """`{id(layer): (a, g)}`: the rows of the layers that may use the factored form.

    A block that `builds_rows` (a convolution) whose number of rows is unknown when
    traced gets a `LazyRows` instead, so that its patches are built only on the
    steps whose batch makes the factored form cheaper (not where the optimizer's
    products are XLA-compiled, which take tensors: there it keeps the full form).

    Args:
        optimizer: the `CurvatureOptimizer`.
        blocks: its preconditioned blocks.
        recording: this step's `Recording`.
        output_grads: the (scaled) loss's gradients with respect to
            `recording.outputs()`, from the backward pass of the gradients; or `None`.
        scale: the loss scale (float32 scalar) by which `output_grads` are divided.

    Returns:
        A dict (float32 rows), empty when the factored form cannot be used.
    """
    if output_grads is None or not _optimizer_allows(optimizer):
        return {}
    output_grads = list(output_grads)

    def rows_of(wanted):
        found = {}
        for block, pair in zip(recording.blocks, recording.rows(output_grads, wanted)):
            if pair is not None:
                found[id(block.layer)] = (tf.cast(pair[0], tf.float32),
                                          tf.cast(pair[1], tf.float32) / scale)
        return found

    wanted, result = set(), {}
    for block in blocks:
        calls = recording.calls(block)
        if not (exact(block) and calls):
            continue
        rows = _static_rows(block, calls)
        if may_factor(block, rows):
            wanted.add(id(block.layer))
        elif (rows is None and block.builds_rows and not optimizer._jit_math
              and may_factor(block, _rows_per_example(block, calls) or 1)):
            # (Not where even one example has more rows than the factored form
            # pays for.)
            key = id(block.layer)
            result[key] = LazyRows(_run_time_rows(block, calls),
                                   lambda key=key: rows_of({key})[key])
    if wanted:
        result.update(rows_of(wanted))
    return result


def gradient(rows, grad_matrix):
    """What `ops.precondition_many` takes for a layer: its gradient matrix, with its
    rows (`ops.FactoredGradient`, or `ops.LazyFactoredGradient` for `LazyRows`)
    when it has some."""
    if rows is None:
        return grad_matrix
    if isinstance(rows, LazyRows):
        return ops.LazyFactoredGradient(rows.count, rows.build, grad_matrix)
    return ops.FactoredGradient(rows[0], rows[1], grad_matrix)


def sparse_rows(block, grads, grad_matrix):
    """An embedding's gradient as its looked-up rows (`tf.IndexedSlices`, or the
    `row_sparse.RowSparse` that `step_gradient` made of them), which
    `ops.precondition_many` multiplies alone; any other gradient as `grad_matrix`."""
    if isinstance(grad_matrix, row_sparse.RowSparse):
        return grad_matrix
    if (block.input_kind == "diagonal" and len(grads) == 1
            and isinstance(grads[0], tf.IndexedSlices)):
        return tf.IndexedSlices(tf.cast(grads[0].values, tf.float32),
                                grads[0].indices, grads[0].dense_shape)
    return grad_matrix


def step_gradient(block, grads, grad_matrix, rows):
    """The gradient a layer's step works with: with `rows` (the grafting step
    controls) an embedding's as a `row_sparse.RowSparse` of its batch's rows, any
    other as `grad_matrix`."""
    sparse = sparse_rows(block, grads, grad_matrix)
    if rows and row_sparse.ENABLED and isinstance(sparse, tf.IndexedSlices):
        return row_sparse.from_slices(sparse, grad_matrix.shape)
    return grad_matrix
