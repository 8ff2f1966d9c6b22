"""Tests for transformer_jax.topology and the dry run on a real TPU compiler.

The TPU compiler comes with libtpu (the ``test`` extras install it); it needs no TPU:
the tiny model is compiled for a v5e:2x2 slice (4 chips) with FSDP x tensor sharding,
once for the module. Skips only when libtpu is not installed.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from transformer_jax import dry_run
from transformer_jax import topology

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tpu_devices(name):
  try:
    return topology.tpu_devices(name)
  except RuntimeError as e:  # libtpu is not installed.
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def report():
  devices = _tpu_devices('v5e:2x2')
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  config.model.attention_impl = 'auto'  # On TPU: the Pallas splash kernel.
  return dry_run.run(config, devices=devices, compile_only=True, decode=True)


def test_slice_names_map_to_topologies():
  devices = _tpu_devices('v5e-8')
  assert len(devices) == 8 and devices[0].device_kind == 'TPU v5 lite'
  # Compile-only v4 exposes both TensorCores of a chip: 8 devices on 4 chips, each
  # with half the chip's HBM and FLOPs.
  v4 = _tpu_devices('v4-8')
  assert len(v4) == 8 and topology.devices_per_chip(v4) == 2
  spec = topology.chip_spec(v4)
  assert spec.hbm_bytes == 16 * 2**30 and spec.peak_flops == 275e12 / 2
  with pytest.raises(ValueError, match='Unknown TPU topology'):
    _tpu_devices('v5e:3x3x3x3')


def test_tpu_report_has_memory_cost_and_collectives(report):
  assert report.device_kind == '4 x TPU v5 lite'
  assert report.hbm_bytes == 16 * 2**30 and report.fits
  cost = report.cost
  # Real TPU buffer assignment: the donated state is aliased (in tiled layouts,
  # (8, 128)-padded, so larger than the logical shards), temporaries exist.
  assert cost.alias_bytes >= report.params_bytes + report.opt_state_bytes
  assert cost.argument_bytes > cost.alias_bytes
  assert cost.temp_bytes > 0
  # FSDP gathers the weights and reduce-scatters (or all-reduces) the gradients.
  kinds = {c.kind: c for c in cost.collectives}
  assert 'all-gather' in kinds and kinds['all-gather'].bytes > 0
  assert {'reduce-scatter', 'all-reduce'} & kinds.keys()
  # The compiler's FLOPs per device are at least the model's matmuls on 1/4 of the
  # batch (it also counts softmax, norms and the optimizer).
  assert cost.flops >= report.model_flops / 4
  assert cost.estimated_seconds > 0 and 0 < report.mfu < 1
  text = report.format()
  assert 'of 16.0 GiB HBM' in text and 'estimated time' in text
  assert 'beam search (K=' in text


def test_auto_attention_compiles_the_splash_kernel_for_tpu(report):
  # A Mosaic kernel for each attention call of the forward pass (encoder self,
  # decoder self and cross in the 1 + 1-layer tiny model), more for the backward.
  assert report.cost.fused_kernels > 3
  assert 'fused kernels' in report.format()
  # The decode runs it in the encoder only (one query per row has nothing to tile).
  assert report.decode.cost.fused_kernels >= 1


def test_decode_compiles_for_the_slice(report):
  d = report.decode
  config = tiny.get_config()
  assert d.beam_size == config.eval.beam_size
  assert d.max_decode_len == d.batch_shape[1] + config.eval.max_extra_length
  assert d.batch_shape[0] % 2 == 0 and d.cost.peak_bytes > 0


def test_collectives_parse_hlo_text():
  hlo = '\n'.join([
      '%all-gather.1 = bf16[32,4,4]{2,1,0:T(4,128)(2,1)} all-gather(%copy.2), '
      'channel_id=1, dimensions={0}',
      '  %all-reduce.7 = (f32[32,32]{0,1:T(8,128)}, f32[32]{0}) all-reduce(%a, %b), '
      'channel_id=2',
      '%all-gather-start.3 = (f32[8,16]{1,0}, f32[16,16]{1,0}) all-gather-start(%p)',
      '%all-gather-done.3 = f32[16,16]{1,0} all-gather-done(%all-gather-start.3)',
      'ROOT %cp = s32[10]{0} collective-permute(%x), source_target_pairs={{0,1}}',
      '%add.1 = f32[32]{0} add(%all-reduce.7, %c)',
  ])
  got = {c.kind: (c.count, c.bytes) for c in topology.collectives(hlo)}
  assert got == {
      'all-gather': (2, 32 * 4 * 4 * 2 + 16 * 16 * 4),
      'all-reduce': (1, (32 * 32 + 32) * 4),
      'collective-permute': (1, 40),
  }


def test_quiet_libtpu_defaults(monkeypatch):
  for name in ('TPU_SKIP_MDS_QUERY', 'ALLOW_MULTIPLE_LIBTPU_LOAD'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'mine')
  monkeypatch.setattr(topology, '_has_local_tpu', lambda: False)
  topology.quiet_libtpu_off_tpu()
  assert os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] == '1'
  assert os.environ['TPU_WORKER_HOSTNAMES'] == 'mine'  # Set by the user: kept.


def test_command_line_rejects_an_unknown_topology():
  out = subprocess.run(
      [sys.executable, '-m', 'transformer_jax.dry_run', '--config=configs/tiny.py',
       '--topology=v9z:2x2'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'Unknown TPU topology' in out.stderr or 'needs libtpu' in out.stderr
  assert 'Traceback' not in out.stderr
