"""Timing helpers the benchmark scripts share.

Scripts in this folder import it as ``timing`` (Python puts a script's folder on
``sys.path``).
"""

import resource
import time
from typing import Callable


def cpu_seconds() -> float:
  """CPU time of this process, all threads: moves less than wall time when other
  processes share the cores."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def interleaved(runs: dict[str, Callable[[], None]], steps: int,
                repeats: int) -> dict[str, dict[str, list[float]]]:
  """Times ``repeats`` blocks of ``steps`` calls of each run, the runs taking turns
  block by block so that all see the same load.

  Returns:
    name -> {'walls': wall seconds a call, one per block; 'cpus': likewise CPU seconds}.
  """
  times = {name: {'walls': [], 'cpus': []} for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      cpu0, wall0 = cpu_seconds(), time.perf_counter()
      for _ in range(steps):
        run()
      times[name]['walls'].append((time.perf_counter() - wall0) / steps)
      times[name]['cpus'].append((cpu_seconds() - cpu0) / steps)
  return times
