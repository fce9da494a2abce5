"""kill -9 at any moment leaves a workdir that resumes exactly (issue 17, item 5).

A real train.py process (tiny model, one device, a checkpoint every 2 steps, asynchronous saves
as the default config has them) is killed with SIGKILL at chosen moments: while a checkpoint is
being written (its temporary directory has appeared), and between saves. The same command then
resumes; every step's loss and gradient norm must equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_run_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
DRIVER = '''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import tiny_run_config
from metal_jax import run_train
c = tiny_run_config(sys.argv[1])
c.num_steps, c.save_every, c.log_every, c.keep_checkpoints = {steps}, 2, 1, 2
c.batch_size, c.async_checkpoints, c.prefetch = 4, True, 2
run_train.train(c, sys.argv[2])
'''


def start(model_dir, workdir) -> subprocess.Popen:
  script = DRIVER.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), steps=STEPS)
  return subprocess.Popen([sys.executable, '-c', script, str(model_dir), str(workdir)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rows(workdir) -> list[tuple]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss'], r['grad_norm']) for r in map(json.loads, f)]


def wait_for(cond, proc, timeout=240.0) -> None:
  t0 = time.monotonic()
  while not cond():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() - t0 < timeout, 'the moment to kill never came'
    time.sleep(0.005)


def n_rows(workdir) -> int:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum(1 for line in f if line.endswith('\n'))
  except OSError:
    return 0


def saving(workdir) -> bool:
  try:
    return any('tmp' in n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n[0] != '.')
  except OSError:
    return False


MOMENTS = {
    # The first asynchronous save past step 2 is being written: its temporary directory exists.
    'during_a_save': lambda w: n_rows(w) >= 3 and saving(w),
    # Between saves, with metrics written past the last checkpoint (they must be redone).
    'between_saves': lambda w: n_rows(w) >= 7 and not saving(w),
}


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return tiny_run_model(tmp_path_factory.mktemp('kill_model'))


@pytest.fixture(scope='module')
def uninterrupted(model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  p = start(model_dir, workdir)
  assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  out = rows(workdir)
  assert [r[0] for r in out] == list(range(1, STEPS + 1))
  return out


@pytest.mark.parametrize('moment', sorted(MOMENTS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(moment, model_dir, uninterrupted,
                                                         tmp_path):
  workdir = tmp_path / 'run'
  p = start(model_dir, workdir)
  wait_for(lambda: MOMENTS[moment](str(workdir)), p)
  p.send_signal(signal.SIGKILL)
  p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL
  killed_at = n_rows(str(workdir))
  assert 0 < killed_at < STEPS
  again = start(model_dir, workdir)  # the same command
  assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]
  assert rows(str(workdir)) == uninterrupted, (moment, killed_at)
