"""One train.py run per workdir (issue 17, item 6): a second process is refused naming the
holder; a lock left by a killed process is taken over with a warning; a clean end leaves none."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import tiny_run_config
from metal_jax import locking, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ('import sys, time; from metal_jax import locking; '
        'locking.WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(60)')


def hold(workdir) -> subprocess.Popen:
  p = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir)], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'held'
  return p


def test_a_second_run_is_refused_naming_the_holder_then_takes_a_dead_ones_lock(tmp_path, caplog):
  workdir = tmp_path / 'run'
  holder = hold(workdir)
  try:
    c = tiny_run_config('/nonexistent-model')  # refused before anything loads
    t0 = time.perf_counter()
    with pytest.raises(locking.WorkdirLocked) as e:
      run_train.train(c, str(workdir))
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert f'in use by pid {holder.pid} on {socket.gethostname()} since ' in msg, msg
    assert str(workdir) in msg and 'another --workdir' in msg
    assert not (workdir / 'checkpoints').exists()  # nothing written by the refused run
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  # The holder died without releasing: the kernel dropped the lock; its record names it.
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    lock = locking.WorkdirLock(str(workdir)).acquire()
  assert f'taking over the lock left by pid {holder.pid}' in caplog.text
  assert json.loads((workdir / '.lock').read_text())['pid'] == os.getpid()
  lock.release()
  assert (workdir / '.lock').read_text() == ''  # a clean end leaves no holder
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='metal_jax'), locking.WorkdirLock(str(workdir)):
    pass
  assert 'taking over' not in caplog.text


def test_only_the_lead_process_takes_the_lock(tmp_path):
  """Processes of one multi-host job share the workdir: the others pass enabled=False."""
  with locking.WorkdirLock(str(tmp_path), enabled=True):
    with locking.WorkdirLock(str(tmp_path), enabled=False):
      pass
    with pytest.raises(locking.WorkdirLocked):
      locking.WorkdirLock(str(tmp_path)).acquire()
