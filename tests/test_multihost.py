"""Multi-process (multi-host) meta-training on one machine: 2 CPU processes x 2 fake devices.

Each process runs train.py's run() (run_train.train) with config.distributed=True
(jax.distributed.initialize from coordinator_address / num_processes / process_id, gloo
collectives between the processes), loads only its own rows of every global batch, and the 4
devices form one data x fsdp mesh. Checked:

* both processes exit 0, promptly (no hang at the coordination service's shutdown barrier);
* process 0 alone writes metrics.jsonl (one row per step), and the losses equal those of a
  single-process run on 4 fake devices with the same config (float32, relative diff <= 1e-5);
* Orbax (async saves) leaves a checkpoint at the final step;
* a second 2-process job resumes from that checkpoint, and its steps equal the uninterrupted
  single-process run's;
* when one process fails, every process exits within seconds (not after the 5-minute shutdown
  barrier timeout that ends in "Shutdown barrier has failed").

The workers are this file run as a script (`python tests/test_multihost.py CONFIG WORKDIR`), in
fresh interpreters with their own XLA_FLAGS. Run with `pytest -s` to see timings and diffs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5
N_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS, FIRST_STOP = 4, 2  # the 2-process job stops at 2 (a checkpoint), then resumes to 4
TIMEOUT_S = 150  # per job; a hung job is killed and reported with every process's log
FAIL_ENV = 'METAL_TEST_FAIL_PROCESS'  # test hook: this process raises at its 2nd batch


def _worker(config_path: str, workdir: str) -> None:
  """One process of a job: the config from JSON, train.run(), a JSON summary line on stdout."""
  import logging

  import ml_collections

  import train  # the entry point: its run() is run_train.train + a prompt exit on failure

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if os.environ.get(FAIL_ENV, '') == str(config.process_id):
    from metal_jax import sharding
    global_batch, calls = sharding.global_batch, []

    def fail_second(*args):  # after step 1, so the other process waits inside a collective
      calls.append(1)
      if len(calls) == 2:
        raise RuntimeError(f'injected failure in process {config.process_id}')
      return global_batch(*args)
    sharding.global_batch = fail_second
  summary = train.run(config, workdir)
  import jax
  print(json.dumps({'process_index': jax.process_index(), 'process_count': jax.process_count(),
                    'device_count': jax.device_count(), 'steps': summary['steps'],
                    'last': summary['last']}), flush=True)


if __name__ == '__main__':
  _worker(sys.argv[1], sys.argv[2])
  sys.exit(0)


# ----------------------------------------------------------------------------- the tests

import pytest  # noqa: E402


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(n_devices: int, extra: dict | None = None) -> dict:
  env = {k: v for k, v in os.environ.items()  # loopback only: no proxies, no inherited JAX_*
         if not k.lower().endswith('_proxy') and not k.startswith('JAX_') and k != FAIL_ENV}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices}',
             HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1',
             **(extra or {}))
  env['PYTHONPATH'] = os.pathsep.join(p for p in [str(ROOT), env.get('PYTHONPATH', '')] if p)
  return env


class Job:
  """n_processes workers of one config; wait() kills them all (SIGKILL: in a distributed
  process JAX's preemption notifier catches SIGTERM) if the job outlives TIMEOUT_S."""

  def __init__(self, config: dict, workdir: Path, logdir: Path, n_processes: int, n_devices: int,
               extra_env: dict | None = None):
    logdir.mkdir(parents=True, exist_ok=True)
    self.logdir, self.n = logdir, n_processes
    port = free_port() if n_processes > 1 else 0
    self.procs = []
    self.t0 = time.monotonic()
    for i in range(n_processes):
      cfg = dict(config)
      if n_processes > 1:
        cfg.update(distributed=True, coordinator_address=f'localhost:{port}',
                   num_processes=n_processes, process_id=i)
      cfg_path = logdir / f'config{i}.json'
      cfg_path.write_text(json.dumps(cfg))
      with open(logdir / f'p{i}.out', 'w') as out, open(logdir / f'p{i}.err', 'w') as err:
        self.procs.append(subprocess.Popen(
            [sys.executable, __file__, str(cfg_path), str(workdir)], stdout=out, stderr=err,
            cwd=str(ROOT), env=child_env(n_devices, extra_env)))

  def wait(self) -> tuple[bool, float]:
    """(timed_out, seconds until every process had exited)."""
    deadline = self.t0 + TIMEOUT_S
    timed_out = False
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
        break
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    return timed_out, time.monotonic() - self.t0

  def err(self, i: int) -> str:
    return (self.logdir / f'p{i}.err').read_text()

  def report(self) -> str:
    return '\n'.join(f'--- process {i}: exit code {p.returncode}\n{self.err(i)[-3000:]}'
                     for i, p in enumerate(self.procs))

  def summaries(self) -> list[dict]:
    out = []
    for i in range(self.n):
      lines = [ln for ln in (self.logdir / f'p{i}.out').read_text().splitlines()
               if ln.startswith('{')]
      assert lines, self.report()
      out.append(json.loads(lines[-1]))
    return out


def run_job(config: dict, workdir: Path, logdir: Path, n_processes: int,
            n_devices: int) -> list[dict]:
  """Runs a job that must succeed; returns each process's summary."""
  job = Job(config, workdir, logdir, n_processes, n_devices)
  timed_out, secs = job.wait()
  assert not timed_out, f'the {n_processes}-process job did not end in {TIMEOUT_S} s\n{job.report()}'
  assert all(p.returncode == 0 for p in job.procs), job.report()
  print(f'\n{logdir.name}: {n_processes} process(es), {secs:.1f} s')
  return job.summaries()


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir) -> list[int]:
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory) -> dict:
  """tests/test_training.py's tiny run config (a saved random GPT-2, 4 synthetic tasks), as JSON."""
  
  from conftest import save_hf
  from metal_jax.data import synthetic

  tokenizer = synthetic.build_tokenizer()
  model_dir = tmp_path_factory.mktemp('mh_model')
  save_hf('gpt2', model_dir, vocab_size=len(tokenizer), n_positions=128)
  tokenizer.save_pretrained(str(model_dir))
  from configs import default
  c = default.get_config()
  c.model = str(model_dir)
  # The suite is written once, here, so that every job reads the same files (each job would
  # otherwise regenerate it from metal_jax/data/synthetic.py as that file is when it starts).
  data_dir = tmp_path_factory.mktemp('mh_suite')
  synthetic.write_suite(str(data_dir), n_train_tasks=4, n_test_tasks=2, n_train_examples=64,
                        n_test_examples=8)
  c.data_dir = str(data_dir)
  c.setting = str(data_dir / 'setting.json')
  c.n_prompt_examples = 3
  c.max_len = 128
  c.pgm.prompt_len = 4
  c.pgm.lstm_layers = 1
  c.lora.rank = 4
  c.batch_size = 4  # 2 rows per process, 1 per device
  c.num_steps = STEPS
  c.optim.lr = 1e-2
  c.mesh.update(data=2, fsdp=2, tensor=1)  # batch and frozen params split across the processes
  c.save_every = 2
  c.log_every = 1
  c.progress = False
  c.async_checkpoints = True  # the default: async saves must be finished before exit
  return json.loads(c.to_json_best_effort())


def test_two_processes_equal_one_and_resume(tmp_path, tiny_config):
  t0 = time.perf_counter()
  ref_dir, mh_dir = tmp_path / 'single', tmp_path / 'multi'
  n_dev = N_PROCESSES * DEVICES_PER_PROCESS

  # The reference: one process, 4 fake devices, uninterrupted.
  [ref] = run_job(tiny_config, ref_dir, tmp_path / 'logs_single', 1, n_dev)
  assert (ref['process_count'], ref['device_count']) == (1, n_dev)
  ref_rows = read_metrics(ref_dir)
  assert [r['step'] for r in ref_rows] == list(range(1, STEPS + 1))

  # 2 processes x 2 devices, stopped at FIRST_STOP (the same LR schedule), then resumed.
  first = run_job({**tiny_config, 'stop_at': FIRST_STOP}, mh_dir, tmp_path / 'logs_multi1',
                  N_PROCESSES, DEVICES_PER_PROCESS)
  assert [(s['process_index'], s['process_count'], s['device_count']) for s in first] == [
      (i, N_PROCESSES, n_dev) for i in range(N_PROCESSES)]
  assert '[Gloo]' in (tmp_path / 'logs_multi1' / 'p0.out').read_text()  # CPU collectives: gloo
  rows1 = read_metrics(mh_dir)
  assert [r['step'] for r in rows1] == list(range(1, FIRST_STOP + 1))  # once each: process 0
  assert checkpoint_steps(mh_dir)[-1] == FIRST_STOP

  second = run_job(tiny_config, mh_dir, tmp_path / 'logs_multi2', N_PROCESSES,
                   DEVICES_PER_PROCESS)
  log0 = (tmp_path / 'logs_multi2' / 'p0.err').read_text()
  assert f'resuming from the checkpoint at step {FIRST_STOP}' in log0  # (process 0 logs)
  rows2 = read_metrics(mh_dir)
  assert [r['step'] for r in rows2] == list(range(1, STEPS + 1))
  assert rows2[:FIRST_STOP] == rows1
  assert checkpoint_steps(mh_dir)[-1] == STEPS
  # The metrics are replicated: every process holds the same values.
  assert second[0]['last']['loss'] == second[1]['last']['loss'] == rows2[-1]['loss']

  diffs = {k: max(rel(m[k], r[k]) for m, r in zip(rows2, ref_rows))
           for k in ('loss', 'grad_norm', 'lr', 'target_tokens')}
  print(f'2 processes vs 1 (max rel diff over {STEPS} steps, resumed at {FIRST_STOP}): ' +
        ', '.join(f'{k} {v:.2e}' for k, v in diffs.items()) +
        f'; losses {[round(r["loss"], 5) for r in rows2]}; {time.perf_counter() - t0:.0f} s')
  assert rel(ref_rows[-1]['loss'], ref_rows[0]['loss']) > 1e-3  # training moved: not vacuous
  for k, v in diffs.items():
    assert v <= REL_TOL, (k, v)


def test_failing_process_ends_the_job_promptly(tmp_path, tiny_config):
  """Process 0 (the coordination service's host) raises at its second batch: it exits 1 with its
  traceback, and process 1 (waiting for it inside step 2's collectives) is stopped at once,
  instead of both waiting 5 minutes (process 0 at the shutdown barrier, process 1 in the
  collective) and then aborting with "Shutdown barrier has failed"."""
  job = Job(tiny_config, tmp_path / 'w', tmp_path / 'logs', N_PROCESSES, DEVICES_PER_PROCESS,
            extra_env={FAIL_ENV: '0'})
  timed_out, secs = job.wait()
  print(f'\na failing process: the job ended in {secs:.1f} s')
  assert not timed_out, job.report()  # TIMEOUT_S < the barrier's 300 s: a hang shows here
  assert job.procs[0].returncode == 1, job.report()
  assert 'injected failure in process 0' in job.err(0)
  assert job.procs[1].returncode != 0, job.report()
  assert 'Shutdown barrier' not in job.err(0) + job.err(1), job.report()
