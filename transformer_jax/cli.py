"""The flags every command line after training shares, and their common start.

One vocabulary for translate, evaluate, explore, checkpoint, export, sample and
classify:

  --workdir            the training run (config.json, vocab/, checkpoints/)
  --checkpoint_step    which checkpoint (default the latest)
  --average_last       the mean of the last K checkpoints up to it (Sec 6.1)
  --beam_size --alpha --max_extra_length --beam_rules --batch_size
                       the search (default config.eval)
  --input              what the command reads, one sentence a line (default stdin)
  --output             where the command writes (a file or a folder, per command)

Each command defines the groups it needs with :func:`define_run_flags` and
:func:`define_search_flags` and wraps its ``main`` with :func:`run` (training's
``main`` with :func:`run_training`). The flags are declared key flags of the
command, so ``--helpshort`` lists them.

The failures an operator can cause and fix (bad data or flags, a missing, locked,
read-only or full workdir, an incompatible or damaged checkpoint, undecodable
input, a diverged run) end a command with one line naming the problem and exit
status 1; ``--verbosity=N`` or ``TRANSFORMER_JAX_TRACEBACK=1`` shows the traceback
instead. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import errno
import logging as pylogging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging

from transformer_jax import host_memory
from transformer_jax.run.lock import WorkdirLockedError

FLAGS = flags.FLAGS
TRACEBACK_ENV = 'TRANSFORMER_JAX_TRACEBACK'
# Errors whose message already says what is wrong and how to fix it.
# ModuleNotFoundError: a package missing from the environment, not a bug in ours.
EXPECTED = (OSError, ValueError, FloatingPointError, TimeoutError, ModuleNotFoundError,
            WorkdirLockedError)
# Library errors (orbax, tensorstore) that wrap an OS condition in another type.
_OS_CONDITIONS = {
    'No space left on device': errno.ENOSPC,
    'Read-only file system': errno.EROFS,
    'Permission denied': errno.EACCES,
    'Disk quota exceeded': errno.EDQUOT,
}


def define_run_flags(*, average_last: int | None = 1) -> None:
  """--workdir, --checkpoint_step and --average_last (its default; None = no flag)."""
  flags.DEFINE_string('workdir', None, 'Training run directory (config.json, vocab/, '
                      'checkpoints/).', required=True)
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: the latest).')
  if average_last is not None:
    flags.DEFINE_integer('average_last', average_last, 'Use the mean of the last K checkpoints up '
                         'to --checkpoint_step (Sec 6.1: 5 base, 20 big); 1 = none.')
  _declare_key_flags(['workdir', 'checkpoint_step'] +
                     (['average_last'] if average_last is not None else []))


def define_search_flags(*, batch_size: bool = True) -> None:
  """--beam_size, --alpha, --max_extra_length, --beam_rules (and --batch_size)."""
  flags.DEFINE_integer('beam_size', None, 'Beam size (default config.eval.beam_size); '
                       '1 = greedy search.')
  flags.DEFINE_float('alpha', None, 'Length penalty exponent (default '
                     'config.eval.length_penalty).')
  flags.DEFINE_integer('max_extra_length', None, 'Output limit beyond the input length '
                       '(default config.eval.max_extra_length).')
  from transformer_jax.inference.search import BEAM_RULES
  flags.DEFINE_enum('beam_rules', None, list(BEAM_RULES), 'Beam search scoring '
                    'and stopping: paper (Sec 6.1, GNMT length penalty) or ctranslate2 '
                    '(as CTranslate2 decodes an export) (default config.eval.beam_rules).')
  names = ['beam_size', 'alpha', 'max_extra_length', 'beam_rules']
  if batch_size:
    flags.DEFINE_integer('batch_size', None, 'Sentences per batch (default '
                         'config.data.eval_batch_size).')
    names.append('batch_size')
  _declare_key_flags(names)


def _declare_key_flags(names: Sequence[str]) -> None:
  """Makes flags defined here show in the calling command's --helpshort.

  absl lists only the main module's own flags there; these are defined in this
  module, so each is declared a key flag of the module that runs.
  """
  main = sys.modules.get('__main__')
  if main is None:
    return
  for name in names:
    FLAGS.register_key_flag_for_module(_module_name(main), FLAGS[name])


def _module_name(module) -> str:
  """absl's name for a module: the script path for the one started by ``-m``."""
  name = module.__name__
  if name == '__main__':
    return sys.argv[0]
  return name


class _QuietLibraries(pylogging.Filter):
  """Drops INFO and WARNING lines of orbax and tensorstore (several per restore),
  which bury a command's own output; errors stay."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorstore'))
    return record.levelno >= pylogging.ERROR or not noisy


def quiet_libraries() -> None:
  """Unless --verbosity is given: only warnings and errors from our code, none of
  the libraries' INFO and WARNING lines."""
  if FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def run(main: Callable[[flags.FlagValues], None], name: str) -> None:
  """``app.run`` for a command: stray arguments are a usage error, library logs are
  quiet, and the errors a user can fix (missing files, bad values) end the command
  with one line ``name: message`` and exit status 1 instead of a traceback (which
  --verbosity shows)."""

  def exit_with(message: str) -> NoReturn:
    print(f'{name}: {message}', file=sys.stderr)
    sys.exit(1)

  def wrapped(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    quiet_libraries()
    _exit_on_expected_failure(lambda: main(FLAGS), exit_with)

  app.run(wrapped)


def run_training(main: Callable[[Sequence[str]], None], name: str, **kwargs) -> None:
  """``app.run(main, **kwargs)`` for training: expected failures as one line.

  Exits without the interpreter's shutdown: after a failed background save, orbax's
  writer threads would each print a traceback while it tears down. Starts by
  re-executing under glibc's huge-page tunable where it applies (host_memory).
  """
  host_memory.reexec_with_huge_pages()

  def exit_with(message: str) -> NoReturn:
    sys.stdout.flush()
    print(f'{name}: error: {message}', file=sys.stderr, flush=True)
    logging.flush()
    os._exit(1)

  def wrapped(argv: Sequence[str]) -> None:
    _exit_on_expected_failure(lambda: main(argv), exit_with)

  app.run(wrapped, **kwargs)


def _exit_on_expected_failure(call: Callable[[], None],
                              exit_with: Callable[[str], NoReturn]) -> None:
  """Runs ``call``; an expected failure (:func:`one_line`) ends in
  ``exit_with(its one-line message)``, anything else, or any failure while a
  traceback is asked for (:func:`_show_traceback`), propagates."""
  try:
    call()
  except Exception as e:  # pylint: disable=broad-except
    message = one_line(e)
    if message is None or _show_traceback():
      raise
    exit_with(message)


def one_line(e: BaseException) -> str | None:
  """The one-line message of an expected failure, or None for anything else."""
  text = ' '.join(str(e).split())
  for condition, code in _OS_CONDITIONS.items():
    if condition in text or getattr(e, 'errno', None) == code:
      where = getattr(e, 'filename', None)
      return condition + (f': {where}' if where else f' ({_shorten(text)})')
  if isinstance(e, EXPECTED):
    if isinstance(e, OSError) and e.filename and e.strerror and not isinstance(
        e, FileNotFoundError):
      return f'{e.strerror}: {e.filename}'
    return _shorten(text) or type(e).__name__
  return None


def _shorten(text: str, limit: int = 600) -> str:
  return text if len(text) <= limit else text[:limit] + '...'


def _show_traceback() -> bool:
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  try:
    return bool(FLAGS['verbosity'].present)
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def read_lines(path: str | None, command: str) -> list[str]:
  """The lines of ``path`` (default stdin) as UTF-8 text.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the input, the line and the first byte that is not UTF-8.
  """
  if path is None:
    return decode_lines(sys.stdin.buffer.read(), 'stdin', command)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Input file {path} not found.')
  with open(path, 'rb') as f:
    return decode_lines(f.read(), path, command)


def decode_lines(data: bytes, where: str, command: str = 'this command') -> list[str]:
  """``data`` split into lines and decoded as UTF-8.

  Raises:
    ValueError: naming ``where``, the line and the first byte that is not UTF-8.
  """
  out = []
  for number, line in enumerate(data.splitlines(), start=1):
    try:
      out.append(line.decode('utf-8'))
    except UnicodeDecodeError as e:
      raise ValueError(f'{where}, line {number}: not UTF-8 text (byte '
                       f'0x{line[e.start]:02x} at column {e.start + 1}); {command} '
                       'reads UTF-8 text, one sentence a line.') from None
  return out


def write_output(path: str | None, text: str) -> None:
  """``text`` to ``path`` (written whole, then renamed into place) or to stdout."""
  if path is None:
    sys.stdout.write(text)
    sys.stdout.flush()
    return
  with open(path + '.tmp', 'w', encoding='utf-8') as out:
    out.write(text)
  os.replace(path + '.tmp', path)


def check_repeated_overrides(argv: Sequence[str]) -> None:
  """A ``--config.key`` given twice is an error (ml_collections would silently
  concatenate two tuple values)."""
  seen = set()
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg.split('=', 1)[0]
      if key in seen:
        sys.exit(f'Error: {key} is given twice; give each --config.key once.')
      seen.add(key)
