"""Transparent huge pages for XLA:CPU's per-run buffers, through glibc's malloc tunable.

XLA:CPU allocates the temporaries of each executable run as one block (the
"temporaries" of the train loop's compile line: 0.6 GiB for configs/multi30k.py's
step) with glibc's malloc, which serves a block that large with a fresh mmap and
unmaps it when the run ends. Every step then faults the whole block back in, one
4 KiB page at a time, each page zeroed by the kernel: system time that grows with
the step's temporaries and computes nothing. With the ``glibc.malloc.hugetlb=1``
tunable (glibc 2.35 and later) malloc marks its mappings for transparent huge
pages, so the kernel fills them 2 MiB at a time. benchmarks/host_memory.py measures
the step with and without it.

glibc reads tunables only when a process starts, so training
(``cli.run_training``) re-executes itself once with ``GLIBC_TUNABLES`` extended
(:func:`reexec_with_huge_pages`), before it loads jax. Nothing changes where the kernel maps huge pages anyway
(``always``) or refuses them (``never``), on other C libraries, where the user's
``GLIBC_TUNABLES`` already sets the tunable, or with ``TRANSFORMER_JAX_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT_ENV = 'TRANSFORMER_JAX_HUGE_PAGES'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)  # The first glibc with the hugetlb tunable.


def environment_with_huge_pages(environ: Mapping[str, str], libc: tuple[str, str],
                                thp_mode: str) -> dict[str, str] | None:
  """The environment to re-execute with, or None when it would change nothing.

  Args:
    environ: the current environment.
    libc: ``platform.libc_ver()``, e.g. ``('glibc', '2.36')``.
    thp_mode: the contents of THP_MODE_FILE, e.g. ``'always [madvise] never'``.
  """
  if environ.get(OPT_OUT_ENV, '1') == '0':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE + '=' in tunables:  # Set by the user (either way), or by our re-execution.
    return None
  name, version = libc
  try:
    major_minor = tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return None
  if name != 'glibc' or major_minor < _MIN_GLIBC:
    return None
  if '[madvise]' not in thp_mode:  # 'always' needs no advice; 'never' ignores it.
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return env


def reexec_with_huge_pages() -> None:
  """Replaces this process with the same command line under the tunable, if it helps.

  Call it first thing in a command's ``__main__`` (before jax creates threads or
  buffers); it returns only when there is nothing to change.
  """
  try:
    with open(THP_MODE_FILE) as f:
      thp_mode = f.read()
  except OSError:  # Not Linux, or no transparent huge pages.
    return
  env = environment_with_huge_pages(os.environ, platform.libc_ver(), thp_mode)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
