"""Test setup: 8 fake CPU devices for the sharding tests, and the shared corpora."""

import os
import pathlib

# Must be set before jax is imported anywhere.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The read-only corpora live beside the repository; TRANSFORMER_JAX_DATA overrides.
SHARED_DATA = pathlib.Path(
    os.environ.get('TRANSFORMER_JAX_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """Folder of the shared parallel corpora; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared corpora not found at {SHARED_DATA} '
                '(set TRANSFORMER_JAX_DATA to their folder)')
  return SHARED_DATA
