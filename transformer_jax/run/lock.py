"""A workdir lock: one training run writes a workdir at a time.

Two trainings on one workdir overwrite each other's orbax temporary folders and
checkpoints. ``WorkdirLock`` holds an exclusive ``fcntl.flock`` on
``workdir/.lock``; the kernel releases it when the holder dies however it dies
(SIGKILL included), so a lock left by a dead process is simply taken over. The
file names the holder (host, pid, start time) for the refusal message.

flock is per host on most network filesystems; on one that does not carry it
across hosts, the lock still keeps two runs on one host apart.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """Exclusive lock on a workdir; use as a context manager or acquire()/release()."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd = None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises WorkdirLockedError naming the holder.

    Raises:
      WorkdirLockedError: a live process holds it.
      OSError: the workdir cannot be created or written (e.g. read-only).
    """
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(
          f'{os.path.dirname(self.path)} is in use by {holder(self.path)}: '
          'one training run per workdir (stop it, or use another --workdir).') from None
    previous = _read(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({
        'host': socket.gethostname(), 'pid': os.getpid(),
        'since': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds')}).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    self.took_over = previous or None  # The holder that died without releasing.
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # Keep the file: unlinking races with a waiter.
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except ValueError:
    return {}


def holder(path: str) -> str:
  """'pid P on host H (since T)' from a lock file, as far as it can be read."""
  try:
    with open(path, encoding='utf-8') as f:
      info = json.loads(f.read() or '{}')
  except (OSError, ValueError):
    info = {}
  if not info:
    return 'another process'
  return (f'pid {info.get("pid")} on host {info.get("host")} '
          f'(since {info.get("since")})')
