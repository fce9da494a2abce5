"""One train.py run per workdir: an exclusive lock held for the run's life.

`WORKDIR/.lock` is locked with flock(2) (the kernel drops it when the holding process dies, however
it dies) and holds who took it: process id, host, start time and command. A second run on the
same workdir stops at once with a UserError naming the holder. A lock file left by a process that
is gone is taken over with a warning naming it. In a multi-host job only process 0 takes the lock
(the processes of one job share the workdir by design).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys

from metal_jax.errors import UserError

log = logging.getLogger('metal_jax')
LOCK_NAME = '.lock'


class WorkdirLocked(UserError):
  """Another live process holds the workdir's lock; the message names it."""


class WorkdirLock:
  """A context manager: `with WorkdirLock(workdir): ...` holds the workdir for the block."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd = None

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or '{}')
    except (OSError, ValueError):
      return {}

  def acquire(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      h = self._holder()
      who = (f'pid {h.get("pid", "?")} on {h.get("host", "?")} since {h.get("started", "?")}'
             if h else 'another process')
      raise WorkdirLocked(f'{os.path.dirname(self.path)}: in use by {who} '
                          f'({h.get("command", "train.py")}); wait for it to end, stop it, or '
                          'use another --workdir') from None
    stale = self._holder()
    if stale:  # the lock was free, yet a holder is written: that process is gone
      log.warning('%s: taking over the lock left by pid %s on %s (since %s), which is no longer '
                  'running', self.path, stale.get('pid'), stale.get('host'), stale.get('started'))
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # a clean end leaves no holder behind
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
