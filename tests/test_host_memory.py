"""Training re-executes itself once under glibc's huge-page malloc tunable, where it applies.

* ``environment_with_huge_pages``: the tunable is appended to the user's
  ``GLIBC_TUNABLES`` only on glibc >= 2.35 with transparent huge pages in ``madvise``
  mode; a tunable already set (by the user or by the re-execution), the opt-out
  variable, other C libraries and the other THP modes change nothing.
* ``cli.run_training``: the command's ``main`` runs once, in a process that has the
  tunable and the original arguments (skipped on machines where it does not apply).
"""

import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from transformer_jax import host_memory

GLIBC = ('glibc', '2.36')
MADVISE = 'always [madvise] never\n'


def test_the_tunable_is_added_on_glibc_with_madvise_huge_pages():
  env = host_memory.environment_with_huge_pages({'PATH': '/bin'}, GLIBC, MADVISE)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = host_memory.environment_with_huge_pages(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, ('glibc', '2.35'), MADVISE)
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}


@pytest.mark.parametrize('environ, libc, thp_mode', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, GLIBC, MADVISE),  # Re-executed already.
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, MADVISE),  # The user's choice.
    ({'TRANSFORMER_JAX_HUGE_PAGES': '0'}, GLIBC, MADVISE),
    ({}, ('glibc', '2.34'), MADVISE),  # No hugetlb tunable before 2.35.
    ({}, ('', ''), MADVISE),  # musl, or a libc platform cannot name.
    ({}, GLIBC, '[always] madvise never\n'),  # Huge pages without advice.
    ({}, GLIBC, 'always madvise [never]\n'),
])
def test_nothing_changes_where_the_tunable_is_set_unavailable_or_useless(
    environ, libc, thp_mode):
  assert host_memory.environment_with_huge_pages(environ, libc, thp_mode) is None


_PROGRAM = """
import os, sys
from transformer_jax import cli
def main(argv):
  print('main', os.environ.get('GLIBC_TUNABLES'), argv[1:], flush=True)
cli.run_training(main, 'probe')
"""


def test_run_training_reexecutes_once_with_the_tunable_and_the_same_arguments():
  try:
    with open(host_memory.THP_MODE_FILE) as f:
      thp_mode = f.read()
  except OSError:
    pytest.skip('no transparent huge pages on this machine')
  environ = {k: v for k, v in os.environ.items()
             if k not in ('GLIBC_TUNABLES', host_memory.OPT_OUT_ENV)}
  if host_memory.environment_with_huge_pages(environ, platform.libc_ver(), thp_mode) is None:
    pytest.skip(f'the tunable does not apply here ({platform.libc_ver()}, THP {thp_mode!r})')
  result = subprocess.run([sys.executable, '-c', _PROGRAM, 'extra'], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env=environ)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["main glibc.malloc.hugetlb=1 ['extra']"]

  environ[host_memory.OPT_OUT_ENV] = '0'
  result = subprocess.run([sys.executable, '-c', _PROGRAM], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env=environ)
  assert result.stdout.splitlines() == ['main None []'], result.stderr
