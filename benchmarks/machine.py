"""What the benchmark scripts print about the machine they ran on.

Scripts in this folder import it as ``machine`` (Python puts a script's folder on
``sys.path``).
"""

import platform


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
