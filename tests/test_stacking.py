"""model.scan_layers: the scanned stacks compute what the unscanned ones do.

Each test builds a model in both layouts, copies the unscanned parameters into the
scanned one (``stacking.stack_params``) and compares logits and gradients (the
scanned gradients unstacked), with remat inside the scan; then decoding with the
stacked cache, the logical 'layers' axis, and checkpoints written in one layout
restored in the other.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import model as model_lib
from transformer_jax import sharding
from transformer_jax.model import stacking
from transformer_jax.model.classifier import EncoderClassifier
from transformer_jax.model.lm import LanguageModel

TINY = model_lib.TransformerConfig(
    vocab_size=50, num_encoder_layers=2, num_decoder_layers=3, d_model=32,
    num_heads=4, d_ff=64, dropout_rate=0.1, max_len=32)
SRC = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0]], np.int32)
TGT = np.array([[20, 21, 22, 1, 0, 0], [23, 24, 25, 26, 27, 1]], np.int32)


def _pair(cls, **changes):
  """(unscanned, scanned) models of ``cls`` holding the same parameters."""
  plain = cls(dataclasses.replace(TINY, **changes), rngs=nnx.Rngs(params=0, dropout=1))
  scanned = cls(dataclasses.replace(TINY, scan_layers=True, **changes),
                rngs=nnx.Rngs(params=1, dropout=1))
  nnx.update(scanned, stacking.stack_params(nnx.state(plain, nnx.Param)))
  return plain, scanned


def _assert_close(got, want, atol=2e-5):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-4)


def _value_and_grads(model, loss_fn):
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  if model.cfg.scan_layers:
    grads = stacking.unstack_params(grads)
  return loss, grads


def _translation_loss(model, deterministic=True):
  logits = model(SRC, model_lib.shift_right(jnp.asarray(TGT)),
                 deterministic=deterministic)
  return jnp.sum(jnp.where(TGT[..., None] > 0, jax.nn.log_softmax(logits), 0.0))


def test_parameters_are_stacked_on_a_named_layers_axis():
  plain, scanned = _pair(model_lib.Transformer)
  flat = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
  kernel = flat[('decoder', 'layers', 'self_attention', 'query_kernel')]
  assert kernel[...].shape == (3, 32, 4, 8)
  assert kernel.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads',
                                                   'head_dim')
  assert flat[('encoder', 'layers', 'feed_forward', 'wi')][...].shape == (2, 32, 64)
  # One nnx.State leaf per parameter kind, not per layer.
  assert len(flat) * 2 < len(jax.tree.leaves(nnx.state(plain, nnx.Param)))
  # The round trip is exact, and the default rules replicate the 'layers' axis.
  _assert_close(stacking.unstack_params(nnx.state(scanned, nnx.Param)),
                nnx.state(plain, nnx.Param), atol=0)
  from configs import default
  rules = sharding.rules_from_config(default.get_config().mesh)
  assert sharding.logical_to_mesh_spec(('layers', 'embed', 'heads', 'head_dim'),
                                       rules) == jax.sharding.PartitionSpec(
                                           None, 'fsdp', 'tensor', None)
  assert stacking.layout_of(['encoder/layers/0/feed_forward/wi']) == 'unscanned'
  assert stacking.layout_of(['encoder/layers/feed_forward/wi']) == 'scanned'
  assert stacking.layout_of(['embed/embedding']) is None


def test_encoder_decoder_scanned_equals_unscanned():
  # remat='dots' in both: remat inside the scan against remat per unrolled layer (the
  # classifier, LM and decoding tests cover the scan without remat).
  plain, scanned = _pair(model_lib.Transformer, remat='dots')
  want_loss, want = _value_and_grads(plain, _translation_loss)
  got_loss, got = nnx.jit(lambda m: _value_and_grads(m, _translation_loss))(scanned)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  _assert_close(got, want)
  weights = scanned.attention_weights(SRC, model_lib.shift_right(jnp.asarray(TGT)))
  _assert_close(weights, plain.attention_weights(
      SRC, model_lib.shift_right(jnp.asarray(TGT))))
  assert weights['cross'].shape == (3, 2, 4, 6, 7)


def test_scanned_dropout_is_replayed_by_remat():
  """Dropout inside the scan: each layer draws its own mask (the [N] keys), and
  remat's recomputation replays it, so loss and gradients match no remat."""
  def dropout_loss(model):
    return _translation_loss(model, deterministic=False)

  results = []
  for remat in ('none', 'full'):
    model = model_lib.Transformer(dataclasses.replace(TINY, scan_layers=True, remat=remat),
                                  rngs=nnx.Rngs(params=0, dropout=1))
    results.append(_value_and_grads(model, dropout_loss))
  (want_loss, want), (got_loss, got) = results
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  _assert_close(got, want, atol=5e-5)
  plain = model_lib.Transformer(TINY, rngs=nnx.Rngs(params=0, dropout=1))
  assert float(want_loss) != float(_translation_loss(plain))  # Dropout was on.


def test_language_model_scanned_equals_unscanned():
  plain, scanned = _pair(LanguageModel, family='decoder_only', remat='full',
                         positions='rope')
  tokens = jnp.asarray(TGT)

  def loss_fn(model):
    return jnp.sum(jax.nn.log_softmax(model(tokens))[:, :-1] *
                   jax.nn.one_hot(tokens[:, 1:], TINY.vocab_size))

  want_loss, want = _value_and_grads(plain, loss_fn)
  got_loss, got = _value_and_grads(scanned, loss_fn)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  _assert_close(got, want)


def test_classifier_scanned_equals_unscanned():
  plain, scanned = _pair(EncoderClassifier, family='encoder_only', pooling='mean')
  _assert_close(scanned(SRC), plain(SRC))
  _assert_close(scanned.masked_lm(SRC, jnp.array([[1, 2], [0, 3]])),
                plain.masked_lm(SRC, jnp.array([[1, 2], [0, 3]])))


@pytest.fixture(scope='module')
def unscanned_run(tmp_path_factory):
  """A workdir whose checkpoint (step 10) holds an unscanned tiny Transformer."""
  from configs import tiny
  from transformer_jax.run import checkpoint as checkpoint_lib
  from transformer_jax.run.workdir import Workdir
  config = tiny.get_config()
  config.model.num_encoder_layers, config.model.num_decoder_layers = 2, 3
  path = tmp_path_factory.mktemp('run')
  wd = Workdir.create(path, config)
  cfg = model_lib.TransformerConfig.from_config(config.model, TINY.vocab_size)
  params = jax.tree.map(np.asarray, nnx.state(
      model_lib.Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param))
  meta = {'vocab_fingerprint': 'abc', 'vocab_size': TINY.vocab_size,
          'param_shapes': checkpoint_lib.param_shapes(params)}
  wd.checkpointer(read_only=False).save(10, params, {'count': np.zeros((), np.int32)},
                                        {}, meta, force=True)
  wd.close()
  return str(path), config, params


def test_workdir_restores_a_checkpoint_into_the_other_layout(unscanned_run):
  from transformer_jax.run.workdir import Workdir
  path, config, saved = unscanned_run
  scanned_config = config.copy_and_resolve_references()
  scanned_config.model.scan_layers = True
  wd = Workdir(path, scanned_config)
  restored = wd.restore()
  assert stacking.layout_of(restored.meta['param_shapes']) == 'scanned'
  _assert_close(restored.params, stacking.stack_params(saved), atol=0)
  # The converted parameters make the same translation model.
  cfg = model_lib.TransformerConfig.from_config(config.model, TINY.vocab_size)
  plain = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  nnx.update(plain, saved)
  tgt_in = model_lib.shift_right(jnp.asarray(TGT))
  _assert_close(wd.model(restored)(SRC, tgt_in), plain(SRC, tgt_in))


def test_resuming_in_the_other_layout_names_the_mismatch(unscanned_run):
  from transformer_jax.run import checkpoint as checkpoint_lib
  from transformer_jax.run.workdir import Workdir
  path, config, _ = unscanned_run
  scanned_config = config.copy_and_resolve_references()
  scanned_config.model.scan_layers = True
  wd = Workdir(path, scanned_config)
  _, abstract, _ = wd.abstract_model(TINY.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = checkpoint_lib.with_shardings(abstract, jax.tree.map(lambda _: device,
                                                                abstract))
  expected = {'vocab_fingerprint': 'abc', 'vocab_size': TINY.vocab_size,
              'param_shapes': checkpoint_lib.param_shapes(abstract)}
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as error:
    wd.checkpointer().restore_params(10, target, expected)
  message = str(error.value)
  assert '\n' not in message
  assert ('stores its layers unscanned (model.scan_layers=False) but the configured '
          'model has them scanned (model.scan_layers=True)') in message


def test_beam_decoding_with_stacked_caches_equals_unscanned():
  from transformer_jax.inference import search
  plain, scanned = _pair(model_lib.Transformer, positions='alibi')
  src = jnp.asarray(SRC)
  caches, results = [], []
  for model in (plain, scanned):
    cache = search.init_beam_cache(model, model.encode(src), src, 2, 5)
    caches.append(cache)
    logits = []
    for token in ([2, 2, 2, 2], [20, 21, 23, 20], [22, 22, 24, 25]):
      step_logits, cache = search.beam_step(model, jnp.array(token, jnp.int32), cache)
      cache = search.reorder_beams(cache, jnp.array([[1, 0], [0, 0]]))
      logits.append(step_logits)
    results.append(logits)
  # Scanned: one [N, ...] array per cache entry, the layers' caches stacked.
  stacked = caches[1].model['layers']['self']['key']
  assert stacked.shape == (3,) + caches[0].model['layers'][0]['self']['key'].shape
  _assert_close(results[1], results[0])
  outputs = [jax.jit(functools.partial(
      search.search_model, beam_size=2, alpha=0.6, max_extra_len=3,
      max_decode_len=8))(*nnx.split(model), src) for model in (plain, scanned)]
  np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
  _assert_close(outputs[1][1], outputs[0][1])


def test_default_beam_reorder_gathers_stacked_caches_on_their_batch_axis():
  """beam_search's default reorder (a gather of cache rows, one row per beam) on a
  scanned model's own cache: told the cache's batch axes, it gathers the stacked
  layer caches [N, B * K, ...] on axis 1 and finds what ``search_model`` (which
  reorders only the beams' ancestry, ``BeamCache``) finds with the unscanned model."""
  from transformer_jax.inference import search
  plain, scanned = _pair(model_lib.Transformer)
  src, beams, settings = jnp.asarray(SRC), 3, dict(alpha=0.6, max_extra_len=3,
                                                   max_decode_len=8)

  def search_rows(graphdef, state, reorder=True, axes=None):
    model = nnx.merge(graphdef, state)
    rows = jnp.repeat(src, beams, axis=0)  # [B * K, S]: each beam its own row.

    def step(token, cache):
      logits, model_cache = model.decode_step(token[:, None], cache['model'],
                                              index=cache['index'])
      return logits[:, 0], {'index': cache['index'] + 1, 'model': model_cache}

    cache = {'index': jnp.zeros((), jnp.int32),
             'model': model.init_cache(model.encode(rows), rows, settings['max_decode_len'])}
    return search.beam_search(
        step, cache, jnp.sum(src != 0, axis=1), beam_size=beams,
        cache_batch_axes=(axes if axes is not None else
                          {'index': 0, 'model': model.cache_batch_axes()}),
        reorder_fn=None if reorder else lambda cache, parents: cache, **settings)

  assert scanned.cache_batch_axes() == {'layers': 1, 'positions': 0, 'src_valid': 0}
  want = jax.jit(functools.partial(search.search_model, beam_size=beams, **settings))(
      *nnx.split(plain), src)
  tokens, scores = jax.jit(search_rows)(*nnx.split(scanned))
  np.testing.assert_array_equal(tokens, want[0])
  _assert_close(scores, want[1])
  with pytest.raises(ValueError, match=r"cache\['model'\]\['layers'\]\['cross'\]\['key'\] "
                     r'\(3, 6, 4, 8, 7\) does not have the 6 rows .* on axis 0'):
    jax.jit(functools.partial(search_rows, axes=0))(*nnx.split(scanned))
  # The beams change parents here: without the reorder their log P would differ.
  _, unordered = jax.jit(functools.partial(search_rows, reorder=False))(
      *nnx.split(scanned))
  assert np.abs(np.asarray(unordered) - np.asarray(want[1])).max() > 1e-2


def test_language_model_cached_decoding_scanned_equals_unscanned():
  plain, scanned = _pair(LanguageModel, family='decoder_only', positions='rope')
  results = []
  for model in (plain, scanned):
    cache = model.init_cache(2, 6)
    prefill, cache = model.decode_step(jnp.asarray(TGT[:, :3]), cache, index=0)
    step, cache = model.decode_step(jnp.asarray(TGT[:, 3:4]), cache, index=3)
    results.append((prefill, step))
  _assert_close(results[1], results[0])
  # The cached steps give the teacher-forced logits.
  _assert_close(results[1][1][:, 0], plain(jnp.asarray(TGT[:, :4]))[:, 3])
