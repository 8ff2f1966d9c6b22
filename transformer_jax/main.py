"""Command-line entry point: train and evaluate one config in one workdir.

  python -m transformer_jax.main --config=configs/multi30k.py --workdir=runs/multi30k \
      [--config.model.dropout_rate=0.2 ...]

On several hosts (TPU pod slices, SLURM, or ``--coordinator_address``) every host
runs the same command; ``jax.distributed.initialize`` joins them first.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from transformer_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py), with --config.key=value '
    'overrides.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, the '
                               'vocabulary and TensorBoard summaries.', required=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-host runs that '
    'jax cannot detect by itself (TPU pods and SLURM it detects).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0-based.')


def _launched_on_several_hosts() -> bool:
  """Whether the environment describes a multi-process job jax can join by itself."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')  # A TPU pod slice.


def _maybe_initialize_distributed() -> None:
  """Joins the other processes when flags or the environment name a cluster."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError('--coordinator_address needs --num_processes and --process_id.')
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _launched_on_several_hosts():
    jax.distributed.initialize()  # Addresses and ids from the cluster environment.
  else:
    return
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO and WARNING lines of orbax and tensorstore: several per save, and
  a WARNING per option each time the final evaluation opens the checkpoints
  read-only to average them.

  Progress lines, our warnings and the libraries' errors stay; ``--verbosity=1``
  shows everything.
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    noisy = '/orbax/' in record.pathname or '/tensorstore/' in record.pathname
    if noisy and record.levelno >= pylogging.ERROR:
      # A failed background save logs its traceback from every writer thread; the
      # error itself reaches the loop and is reported there in one line.
      record.msg, record.args = record.getMessage().splitlines()[0][:300], None
      record.exc_info = record.exc_text = None
    return record.levelno >= pylogging.ERROR or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  from transformer_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def parse_flags(argv):
  """absl flag parsing, with a one-line error for an unknown or repeated --config.key."""
  cli.check_repeated_overrides(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections reports the missing field (and a "Did you mean" hint) as a
    # KeyError wrapped in an AttributeError; unwrap it to one readable line.
    message = str(e.args[0] if e.args else e)
    while isinstance(message, str) and message[:1] in '"\'' and message[-1:] in '"\'':
      message = message[1:-1]
    message = message.replace('\\n', ' ').replace("\\'", "'").replace('\n', ' ')
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    sys.exit(f'Error: unknown config key {message} (in {", ".join(bad)}): every '
             '--config.key must name a field the config file defines '
             '(see configs/default.py).')
  except flags.Error as e:
    sys.exit(f'Error: {e}\nRun with --helpfull for the flags.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run_training(main, 'main', flags_parser=parse_flags)
