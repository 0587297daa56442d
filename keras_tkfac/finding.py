"""Which layers of a wrapped model get a curvature block (`CurvatureModel.blocks`).

`find_blocks` walks the model's layers (excluded layers and those nested in them
left out, recurrent cells' layers left to the fallback); `BlockFinder` keeps the
blocks found and finds them again when the model's layers, the registry
(`register_block` after `wrap`) or a layer's configuration (LoRA enabled or
quantization applied after `wrap`) change, until the optimizer is built.
"""

from absl import logging
import keras

from keras_tkfac import blocks as blocks_lib
from keras_tkfac import capture
from keras_tkfac import reuse


def _recurrent_sublayers(layers):
    """Ids of the layers called inside a recurrent layer's loop (its cell's layers)."""
    found = set()
    for layer in layers:
        if isinstance(layer, keras.layers.RNN):
            found.update(
                id(sub) for sub in layer._flatten_layers(include_self=False)
            )
    return found


def _excluded_layers(layers, exclude):
    """Ids of the layers `exclude` names (by name or class) and of every layer
    nested in them: excluding a `MultiHeadAttention` excludes its projections."""
    names = {e for e in exclude if isinstance(e, str)}
    types = tuple(e for e in exclude if isinstance(e, type))
    excluded = set()
    for layer in layers:
        if layer.name in names or (types and isinstance(layer, types)):
            excluded.update(
                id(sub) for sub in layer._flatten_layers(include_self=True, recursive=True))
    return excluded


def as_sequence(exclude):
    """`exclude` as a tuple: one name or class alone counts as a list of one (a
    string would otherwise be read as its characters)."""
    if isinstance(exclude, (str, type)):
        return (exclude,)
    try:
        return tuple(exclude)
    except TypeError:
        raise ValueError("exclude must hold layer names or layer classes. "
                         f"Received: exclude={exclude!r}") from None


def _unknown_names(layers, exclude):
    """The names in `exclude` that no layer in `layers` has."""
    names = {layer.name for layer in layers}
    return [e for e in exclude if isinstance(e, str) and e not in names]


def exclusions_to_config(model, exclude):
    """`exclude` for a `.keras` file: a class by its registered name, a layer name
    with the position and class of the layer it names among the model's layers,
    so that loading finds that layer where its name differs (Keras's automatic
    names, `dense_4`, depend on the layers a process made before)."""
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    saved = []
    for e in exclude:
        if not isinstance(e, str):
            saved.append({"layer_class": keras.saving.get_registered_name(e)})
            continue
        position = next((i for i, layer in enumerate(layers) if layer.name == e), None)
        saved.append(e if position is None else {
            "layer": e, "position": position,
            "class": keras.saving.get_registered_name(type(layers[position]))})
    return saved


def exclusions_from_config(model, saved, layer_class):
    """The `exclude` of `exclusions_to_config`'s `saved` for the loaded `model`;
    `layer_class(name)` gives a class from its registered name. A name that no
    layer has now is taken as the name of the layer at its saved position when
    that layer's class is the saved one; otherwise it is kept (and `wrap`'s check
    names it)."""
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    names = {layer.name for layer in layers}
    exclude = []
    for e in saved:
        if isinstance(e, str):
            exclude.append(e)
        elif "layer_class" in e:
            exclude.append(layer_class(e["layer_class"]))
        elif (e["layer"] not in names and e["position"] < len(layers)
              and keras.saving.get_registered_name(type(layers[e["position"]]))
              == e["class"]):
            exclude.append(layers[e["position"]].name)
        else:
            exclude.append(e["layer"])
    return exclude


def layer_positions(model):
    """`{id(layer): index}` over the model's layers, nested ones included, in the
    order Keras lists them (the first position of a shared layer): the same for a
    model loaded from its file, whatever names its layers take there."""
    positions = {}
    layers = model._flatten_layers(include_self=False, recursive=True)
    for i, layer in enumerate(layers):
        positions.setdefault(id(layer), i)
    return positions


def unsaved_layers(model, exclude, saved_blocks):
    """Names of the layers of a loaded `model` that would get a block now but had
    none in its file (a block class registered since it was saved): loading
    leaves them to the partner, so that the saved optimizer state, whose variables
    follow the saved blocks, is restored. Files written before block positions
    were saved are matched by layer name, where the names still match."""
    found, _ = find_blocks(model, exclude)
    if all("position" in saved for saved in saved_blocks):
        positions = layer_positions(model)
        kept = {saved["position"] for saved in saved_blocks}
        return [b.layer.name for b in found if positions[id(b.layer)] not in kept]
    kept = {saved["layer"] for saved in saved_blocks}
    if not kept <= {b.layer.name for b in found}:
        return []
    return [b.layer.name for b in found if b.layer.name not in kept]


def find_blocks(model, exclude, known=None):
    """The blocks of `model`'s layers, reusing those in `known` (`{id(layer): block}`).

    Returns:
        `(blocks, recurrent)`: the blocks, and the names of layers that have a
        block class but run inside a recurrent layer's loop (left to the fallback).
    """
    known = known or {}
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    recurrent = _recurrent_sublayers(layers)
    excluded = _excluded_layers(layers, exclude)
    found, skipped = [], []
    seen = set()
    for layer in layers:
        # Frozen layers get blocks too: they may be unfrozen later, and the
        # optimizer's `build` only preconditions trainable variables.
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if id(layer) in excluded:
            continue
        block = known.get(id(layer)) or blocks_lib.block_for(layer)
        if block is None:
            continue
        if id(layer) in recurrent:
            # A recurrent layer calls its cell inside a `tf.while_loop`, whose
            # tensors cannot be recorded for the step's tape.
            skipped.append(layer.name)
            continue
        found.append(block)
    return found, skipped


class BlockFinder:
    """The blocks of `model`'s current layers, found again when they change.

    Args:
        model: the wrapped Keras model.
        exclude: the tuple of layer names or classes left to the fallback.
    """

    def __init__(self, model, exclude):
        self.model = model
        self.exclude = exclude
        for item in exclude:
            if not isinstance(item, (str, type)):
                raise ValueError(
                    "exclude must hold layer names or layer classes. "
                    f"Received: exclude={exclude!r}")
        self._key, self._blocks = (), []
        self._registry_warned = False
        self._recurrent_warned = False

    def _key_of(self, layers):
        # The layers, the block class registered for each (a block registered
        # after `wrap`, `register_normalization_blocks()`, counts until the
        # optimizer is built) and what a block may decline (LoRA enabled or
        # quantization applied after `wrap`: the layer's weights are then others).
        return (tuple(id(layer) for layer in layers),
                tuple(blocks_lib.BLOCKS.get(type(layer)) for layer in layers),
                tuple((bool(getattr(layer, "lora_enabled", False)),
                       getattr(layer, "quantization_mode", None)) for layer in layers))

    def blocks(self, optimizer_built):
        """The current blocks; `optimizer_built`: whether the optimizer has state
        for the blocks found before (they then stay, or a change raises)."""
        layers = list(self.model._flatten_layers(include_self=False, recursive=True))
        key, cached_key, cached = self._key_of(layers), self._key, self._blocks
        if key == cached_key:
            return list(cached)
        if cached_key and cached_key[0] == key[0] and optimizer_built:
            if cached_key[2] != key[2]:
                changed = [layer.name for layer, old, new in zip(
                    layers, cached_key[2], key[2]) if old != new]
                raise ValueError(
                    f"Layer(s) {changed} had LoRA enabled or were quantized after "
                    "the optimizer was built for their weights; compile the model "
                    "again with a new optimizer. Received: model="
                    f"{self.model.name!r}")
            # Only the registry changed, after the optimizer was built for these
            # blocks: its state and the recorded outputs stay aligned with them.
            if not self._registry_warned:
                self._registry_warned = True
                logging.warning(
                    "keras_tkfac: a block was registered after the optimizer of "
                    "model %r was built; that model keeps the blocks it was built "
                    "with. Register blocks before `wrap` (or before the first "
                    "step).", self.model.name)
            self._key = key
            return list(cached)
        unknown = _unknown_names(layers, self.exclude)
        if unknown and self.model.built:
            # (An unbuilt model may still create the layer in its `build`.)
            raise ValueError(
                f"exclude names no layer of the model: {unknown}. Its layers: "
                f"{sorted({layer.name for layer in layers})}. Received: "
                f"exclude={self.exclude!r}")
        known = {id(block.layer): block for block in cached}
        if cached_key:
            # A layer whose registration or configuration changed gets a new block.
            before = dict(zip(cached_key[0], zip(cached_key[1], cached_key[2])))
            for layer, now in zip(layers, zip(key[1], key[2])):
                if before.get(id(layer), now) != now:
                    known.pop(id(layer), None)
        found, recurrent = find_blocks(self.model, self.exclude, known)
        for block in found:
            capture.install(block)
        for layer in layers:  # (after `capture.install`: it wraps the recording call)
            reuse.install(layer)
        if recurrent and not self._recurrent_warned:
            self._recurrent_warned = True
            logging.warning(
                "keras_tkfac: layer(s) %s run inside a recurrent layer's loop and "
                "take the first-order fallback.", ", ".join(recurrent))
        self._key, self._blocks = key, found
        return list(found)
