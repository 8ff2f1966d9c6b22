"""A stack's N identical layers: a list, or one module scanned over a 'layers' axis.

``TransformerConfig.scan_layers`` picks the layout of every stack (the encoder, the
decoder, and so the language model's and the classifier's stacks too):

  False   ``nnx.List`` of N layer modules; a forward pass traces N copies of the
          layer, so compile time grows with N.
  True    one layer module whose parameters (and dropout RNG streams) carry a
          leading [N] axis with the logical name ``'layers'`` (created by
          ``nnx.vmap`` over split RNG streams); a forward pass is one ``nnx.scan``
          over that axis, the layer body traced and compiled once whatever N.

  create(cfg, N, make_layer, rngs)      either layout
  run(layers, cfg, call, x, ...)        x through the N layers, each wrapped in
                                        ``model.remat``'s policy, threading each
                                        layer's decode cache when there is one
  init_caches(layers, cfg, make)        the layers' empty caches: a list of dicts,
                                        or one dict of [N, ...] arrays scanned
  cache_batch_axis(cfg)                 where the batch axis of those caches is
  stack_params / unstack_params         convert an nnx.State between the layouts

Checkpoints hold the layout they were trained with: ``'encoder/layers/3/...'``
entries unscanned, ``'encoder/layers/...'`` of shape [N, ...] scanned; see
``run/checkpoint.py`` for what restoring into the other layout does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# The logical name of the stacked axis (``config.mesh.rules`` maps it; replicated
# by default: each device holds every layer's slice of the other axes).
LAYERS_AXIS = 'layers'
_SCAN_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}

# config.model.remat -> what jax.checkpoint keeps for the backward pass.
REMAT_POLICIES = {
    # The outputs of the weight matmuls (no batch dims: projections, FFN); attention
    # scores, softmax, norms and dropout are recomputed.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,  # Only each layer's inputs.
}


def create(cfg, num_layers: int, make_layer: Callable[[nnx.Rngs], nnx.Module],
           rngs: nnx.Rngs) -> nnx.Module:
  """The N layers of a stack in ``cfg.scan_layers``' layout.

  Args:
    cfg: the TransformerConfig (``scan_layers``).
    num_layers: N.
    make_layer: builds one layer from an ``nnx.Rngs``.
    rngs: the model's RNG streams; scanned, each stream is split N ways so every
      layer draws its own initial weights and dropout masks.

  Returns:
    ``nnx.List`` of N layers, or one layer module with [N, ...] parameters.
  """
  if not cfg.scan_layers:
    return nnx.List([make_layer(rngs) for _ in range(num_layers)])

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers,
            transform_metadata=_SCAN_METADATA)
  def create_stacked(rngs):
    return make_layer(rngs)

  return create_stacked(rngs)


def _remat(cfg, off: bool) -> Callable:
  """``nnx.remat`` with the config's policy; the identity for 'none' and when
  ``off``: while attention probabilities are collected (remat replays the forward
  pass, which must not append to a Python list twice) or when decoding with a cache
  (no gradients)."""
  if cfg.remat == 'none' or off:
    return lambda fn: fn
  return lambda fn: nnx.remat(fn, policy=REMAT_POLICIES[cfg.remat])


def run(layers: nnx.Module, cfg, call: Callable, x: Array, *broadcast: Any,
        caches: Any = None, probs_outs: Sequence[list | None] = ()) -> tuple[Array, Any]:
  """x through every layer of the stack, threading each layer's decode cache.

  Args:
    layers: from :func:`create`.
    cfg: the TransformerConfig (``scan_layers``, ``remat``).
    call: ``call(layer, x, cache, *broadcast, *outs) -> (x, cache)`` applies one
      layer; ``cache`` is that layer's cache (None without one); ``outs`` are
      ``probs_outs``' lists (or None), to which the layer appends its attention
      probabilities.
    x: [B, T, D], the input of the first layer.
    *broadcast: arrays (or None) every layer reads unchanged: masks, positions,
      the encoder output. Passed as arguments, not closed over, so that remat and
      scan see them as inputs.
    caches: None, or the layers' caches (:func:`init_caches`): a list of per-layer
      dicts unscanned, one dict of [N, ...] arrays scanned.
    probs_outs: lists that get one probability array per layer (visualisation);
      scanned, the scan returns them stacked and they are appended per layer.

  Returns:
    (the last layer's output [B, T, D], the updated caches in their layout or None).
  """
  collecting = any(out is not None for out in probs_outs)
  remat = _remat(cfg, collecting or caches is not None)
  if not cfg.scan_layers:
    new_caches = []
    for i, layer in enumerate(layers):
      x, cache = remat(
          lambda layer, x, cache, *broadcast: call(layer, x, cache, *broadcast,
                                                   *probs_outs))(
              layer, x, None if caches is None else caches[i], *broadcast)
      new_caches.append(cache)
    return x, None if caches is None else new_caches

  if caches is not None:
    return _decode_scan(layers, call, x, caches, broadcast, len(probs_outs))

  @nnx.scan(in_axes=(nnx.Carry, 0) + (None,) * len(broadcast),
            out_axes=(nnx.Carry, 0), transform_metadata=_SCAN_METADATA)
  def body(x, layer, *broadcast):
    outs = tuple(None if out is None else [] for out in probs_outs)
    x, _ = remat(
        lambda layer, x, *broadcast: call(layer, x, None, *broadcast, *outs))(
            layer, x, *broadcast)
    return x, tuple(out[0] for out in outs if out is not None)  # Each [N, ...].

  x, stacked = body(x, layers, *broadcast)
  for out, probs in zip([out for out in probs_outs if out is not None], stacked):
    out.extend(list(probs))
  return x, None


def _decode_scan(layers, call, y, caches, broadcast, num_outs):
  """The scanned stack with caches: ``jax.lax.scan`` over the layers' split state.

  A search calls the model inside its own ``jax.lax.while_loop``, on a model merged
  outside the loop; ``nnx.scan`` may not take Variables of an outer trace level as
  inputs, so the state is split here and each layer merged inside the body. A
  cached decode is deterministic and changes no Variable (the RNG streams are not
  drawn from), so no state flows back.
  """
  graphdef, state = nnx.split(layers)

  def body(y, xs):
    layer_state, cache = xs
    return call(nnx.merge(graphdef, layer_state), y, cache, *broadcast,
                *(None,) * num_outs)  # No probabilities while decoding.

  return jax.lax.scan(body, y, (state, caches))


def init_caches(layers: nnx.Module, cfg, make: Callable[[nnx.Module], Any]) -> Any:
  """Every layer's empty decode cache, ``make(layer)``, in the stack's layout: a
  list of dicts, or (scanned) one dict of [N, ...] arrays made by ``nnx.vmap``."""
  if not cfg.scan_layers:
    return [make(layer) for layer in layers]
  return nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata=_SCAN_METADATA)(layers)


def cache_batch_axis(cfg) -> int:
  """The batch axis of every array in :func:`init_caches`' caches: 0 in the
  per-layer dicts, 1 behind the stacked [N] axis when scanned."""
  return 1 if cfg.scan_layers else 0


# ----------------------------------------------------------------------------
# Converting parameters between the layouts.

_UNSTACKED = re.compile(r'(^|/)layers/(\d+)(/|$)')
_STACKED = re.compile(r'(^|/)layers/(?!\d+(/|$))')


def layout_of(names: Sequence[str]) -> str | None:
  """'scanned', 'unscanned' or None (no stacks) for parameter paths like
  ``'encoder/layers/0/feed_forward/wi'`` (as ``checkpoint.param_shapes`` names them)."""
  if any(_UNSTACKED.search(n) for n in names):
    return 'unscanned'
  if any(_STACKED.search(n) for n in names):
    return 'scanned'
  return None


def _flat(state: nnx.State) -> dict[tuple, Any]:
  return dict(nnx.to_flat_state(state))


def stack_params(state: nnx.State) -> nnx.State:
  """The unscanned layout's state -> the scanned one: every ``.../layers/i/rest``
  leaf becomes row i of one ``.../layers/rest`` leaf of shape [N, ...]."""
  flat, groups = {}, {}
  for path, leaf in _flat(state).items():
    if 'layers' in path and isinstance(path[path.index('layers') + 1], int):
      at = path.index('layers')
      key = path[:at + 1] + path[at + 2:]
      groups.setdefault(key, {})[path[at + 1]] = leaf
    else:
      flat[path] = leaf
  for key, rows in groups.items():
    rows = [rows[i] for i in range(len(rows))]
    value = jnp.stack([r[...] for r in rows])
    names = rows[0].get_metadata().get('out_sharding')
    metadata = {} if not names else {'out_sharding': (LAYERS_AXIS, *names)}
    flat[key] = rows[0].copy(value, **metadata)
  return nnx.from_flat_state(flat)


def unstack_params(state: nnx.State) -> nnx.State:
  """The scanned layout's state -> the unscanned one (the inverse of
  :func:`stack_params`)."""
  flat = {}
  for path, leaf in _flat(state).items():
    if 'layers' in path and not isinstance(path[path.index('layers') + 1], int):
      at = path.index('layers')
      names = leaf.get_metadata().get('out_sharding')
      metadata = {} if not names else {'out_sharding': tuple(names[1:])}
      value = leaf[...]
      for i in range(value.shape[0]):
        flat[path[:at + 1] + (i,) + path[at + 1:]] = leaf.copy(value[i], **metadata)
    else:
      flat[path] = leaf
  return nnx.from_flat_state(flat)
