"""train.py's body: a config -> a meta-trained PGM in a workdir, resumed there by itself.

The library pieces (optimizer, state, step, checkpoint I/O) are metal_jax/training.py;
this module drives them: distributed start-up, the preemption watch, the metric
writer, and the loop, fed by a thread that builds its batches ahead (data/prefetch.py).
experiment.make_trainer builds the state and jitted step for a run (bench/train_step.py times
exactly that step; bench/input_pipeline.py times `batch_loader`, what feeds it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from metal_jax import atomic, experiment, locking, sharding, training
from metal_jax.data.episodes import EpisodeSampler
from metal_jax.data.prefetch import Prefetcher

log = logging.getLogger('metal_jax')


def initialize_distributed(config) -> None:
  """jax.distributed.initialize(): auto-detected on TPU pods / SLURM / MPI, or from the config
  (coordinator_address, num_processes, process_id), e.g. several CPU processes on one machine."""
  kw = {}
  if config.coordinator_address:
    kw = dict(coordinator_address=config.coordinator_address,
              num_processes=config.num_processes, process_id=config.process_id)
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU processes talk via gloo
  jax.distributed.initialize(**kw)


def parameter_counts(params, trainable) -> dict:
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  return {'frozen': total, 'trainable': train, 'trainable_fraction': train / max(total, 1)}


class MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard event files; a no-op off process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self.enabled:
      self.tb.close()


def truncate_metrics(workdir: str, after_step: int) -> None:
  """On resume, drop metric rows past the restored step (they will be written again), and any
  line that does not parse (a partial last line: the previous run was killed mid-write), with a
  warning naming it."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  rows, dropped = [], []
  with open(path, encoding='utf-8', errors='replace') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        step = int(json.loads(line)['step'])
      except (ValueError, KeyError, TypeError):
        dropped.append(i)
        continue
      if step <= after_step:
        rows.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    log.warning('%s: dropped %d unreadable line(s) (line %s; a run killed mid-write)', path,
                len(dropped), ', '.join(map(str, dropped[:5])))
  atomic.write(path, ''.join(rows))


class PreemptionWatch:
  """Tells a one-process training loop to save and stop because the job is being preempted.

  A SIGTERM handler (installed for the duration of the `with` block, main thread
  only) marks the next step boundary; the loop saves that step and returns, and
  rerunning resumes. With several processes it stays out of the way: JAX's
  preemption service owns SIGTERM there, and Orbax's `save` already writes a
  checkpoint at the step the service agrees. Stopping there too was tried and is
  not done: in one of three 2-process runs the service let one process reach the
  agreed step and not the other, and the job hung in the next collective.
  """

  def __init__(self):
    self.signalled, self._previous = False, None  # _previous: the handler to put back, if any

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm) or signal.SIG_DFL
    return self  # (a handler installed outside Python reads back as None: restored as SIG_DFL)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame):
    self.signalled = True


def batch_loader(sampler: EpisodeSampler, mesh) -> Callable[[int], tuple[dict, dict]]:
  """step -> (this process's rows of the step's batch, the global batch on the mesh): what the
  prefetch thread computes, the transfer included, so that both overlap the device's step."""
  def load(step: int):
    local = sampler.batch(step)
    return local, sharding.global_batch(local, mesh)
  return load


def num_steps(config, sampler: EpisodeSampler) -> int:
  """The run's length: num_steps, else epochs over the meta-train episodes."""
  return config.num_steps or max(config.epochs * sampler.episodes_per_epoch // config.batch_size,
                                 1)


def train(config, workdir: str) -> dict:
  """Meta-trains the PGM (Equation 1) as `config` says; resumes from `workdir` by itself.

  Returns a summary (final step, last loss, timings). Only process 0 logs and
  writes metrics; Orbax coordinates checkpoint writes across processes.
  """
  experiment.validate(config)  # before anything is written
  if config.distributed:
    initialize_distributed(config)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # One run per workdir: a second train.py stops here, naming the holder (process 0 holds it
  # for a multi-host job).
  with locking.WorkdirLock(workdir, enabled=lead):
    return _train(config, workdir, lead)


def _train(config, workdir: str, lead: bool) -> dict:
  mngr = training.checkpoint_manager(os.path.join(workdir, 'checkpoints'),
                                     save_every=config.save_every, keep=config.keep_checkpoints,
                                     async_save=config.async_checkpoints)
  cfg_json = experiment.config_json(config)
  skip_nonfinite = bool(config.get('skip_nonfinite_steps', False))
  on_disk = mngr.all_steps()
  start = None
  if on_disk:  # the newest intact checkpoint's config; refused before anything is prepared
    start, saved = training.newest_intact(mngr, on_disk,
                                          functools.partial(training.saved_config, mngr))
    training.check_resume_config(saved, cfg_json, str(mngr.directory))
  run = experiment.setup(config, workdir)
  tasks, mesh, lm = run.tasks, run.mesh, run.lm

  sampler = EpisodeSampler(tasks, run.spec, config.batch_size, config.seed,
                           jax.process_index(), jax.process_count())
  steps = num_steps(config, sampler)
  trainer = experiment.make_trainer(config, lm.module, mesh, run.param_shardings, steps)
  state = trainer.init(jax.random.key(config.seed))
  step_fn, schedule = trainer.step_fn, trainer.schedule
  skipped = 0  # non-finite steps skipped (skip_nonfinite_steps), this run and those it resumes
  if start is not None:
    abstract = training.abstract_like(state)

    def restore(step):  # (an older checkpoint than the one checked above: its config too)
      training.check_resume_config(training.saved_config(mngr, step), cfg_json,
                                   str(mngr.directory))
      return training.restore_checkpoint(mngr, step, abstract)

    # The newest checkpoint that verifies, restores and is finite; broken ones are skipped.
    start, (state, data_state) = training.newest_intact(
        mngr, [s for s in on_disk if s <= start], restore)
    skipped = int(data_state.pop('nonfinite_skipped', 0))
    sampler.restore(data_state, where=str(mngr.directory))
    newer = [s for s in mngr.all_steps() if s > start]
    if newer:  # broken: out of the way, so that the run writes these steps again
      training.set_aside(mngr, newer)
    if lead:
      truncate_metrics(workdir, start)
      log.info('resuming from the checkpoint at step %d in %s', start, mngr.directory)
  elif lead:
    truncate_metrics(workdir, 0)  # rows of an earlier attempt that saved no checkpoint
  counts = parameter_counts(lm.params, state['trainable'])
  if lead:
    log.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size,
             jax.process_count())
    log.info('parameters: frozen %s, trainable %s (%.4f%%)', f'{counts["frozen"]:,}',
             f'{counts["trainable"]:,}', 100 * counts['trainable_fraction'])
    log.info('%d steps of %d episodes (%d meta-train tasks, %d episodes an epoch)', steps,
             config.batch_size, len(tasks), sampler.episodes_per_epoch)
  writer = MetricWriter(workdir, enabled=lead)
  rng = jax.random.key(config.seed + 1)
  first = int(state['step'])
  bar = tqdm(range(first, steps), initial=first, total=steps, desc='meta-train',
             dynamic_ncols=True, disable=not lead or not config.progress)
  window_tokens, window_t, last = 0, time.perf_counter(), {}
  compile_s = None
  stop = min(config.stop_at, steps) if config.stop_at else steps
  preempted = None
  saver = training.CheckpointSaver(mngr, config.async_checkpoints)
  # The steps' non-finite flags (device scalars), read only when the host reads anyway: at a log
  # step, and before every save, so that no checkpoint holds a diverged state.
  unread: list[tuple[int, jax.Array]] = []

  def check_finite(now: int) -> None:
    nonlocal skipped
    flags = jax.device_get([f for _, f in unread])
    bad = [st for (st, _), f in zip(unread, flags) if f > 0]
    unread.clear()
    if not bad:
      return
    if not skip_nonfinite:  # stop: nothing of this state is saved; the last save is finished
      saver.finish()
      raise training.DivergenceError(bad[0], mngr.latest_step(), str(mngr.directory), now)
    skipped += len(bad)
    if lead:
      log.warning('skipped %d non-finite step(s) (their updates not applied): %s; %d so far',
                  len(bad), ', '.join(map(str, bad[:10])), skipped)

  def data_state() -> dict:
    return {**sampler.state(), 'nonfinite_skipped': skipped} if skip_nonfinite else sampler.state()

  # Batches for steps first..stop-1, built (and put on the mesh) up to config.prefetch steps
  # ahead; leaving the block stops the thread (stop_at, preemption, an exception).
  load = batch_loader(sampler, mesh)
  try:
    with PreemptionWatch() as watch, Prefetcher(load, first, stop, config.prefetch) as batches:
      for s in bar:
        if s >= stop:  # a time-boxed job: stop here, resume later with the same config
          break
        local, batch = next(batches)
        sampler.step = s + 1  # the data state saved with step s + 1 (the thread runs ahead of it)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, lm.params, batch, rng)
        unread.append((s + 1, metrics.pop('nonfinite')))
        if compile_s is None:
          jax.block_until_ready(metrics)
          compile_s = time.perf_counter() - t0
          window_t = time.perf_counter()
        window_tokens += (int(local['pgm_mask'].sum() + local['lm_mask'].sum())
                          * jax.process_count())
        preempt = watch.signalled
        save = s + 1 == stop or preempt or mngr.should_save(s + 1)
        log_now = (s + 1) % config.log_every == 0 or s + 1 == stop or preempt
        if save or log_now:
          check_finite(s + 1)
        if save:
          saver.save(s + 1, state, data_state(), cfg_json)
        if log_now:
          metrics = jax.device_get(metrics)
          dt = time.perf_counter() - window_t
          last = {**{k: float(v) for k, v in metrics.items()},
                  'tokens_per_s': window_tokens / max(dt, 1e-9),
                  'lr': float(schedule(s))}
          if skip_nonfinite:
            last['skipped_steps'] = skipped
          writer.write(s + 1, last)
          bar.set_postfix(loss=f'{last["loss"]:.4f}', tok_s=f'{last["tokens_per_s"]:.0f}')
          window_tokens, window_t = 0, time.perf_counter()
        if preempt:
          preempted = s + 1
          if lead:
            log.info('preempted: saved the checkpoint at step %d in %s; rerun the same command '
                     'to resume', preempted, mngr.directory)
          break
  except BaseException:
    # Finish the saves in flight (and their checksums); with several processes the others may
    # not get there, so this one leaves at once (train.py).
    if jax.process_count() == 1:
      try:
        saver.finish()
        mngr.close()
      except Exception:  # pylint: disable=broad-except
        log.exception('finishing the checkpoints after the error above failed')
    writer.close()
    raise
  saver.finish()
  mngr.close()
  writer.close()
  return {'steps': steps, 'last': last, 'compile_s': compile_s, 'counts': counts,
          'checkpoint_dir': str(mngr.directory), 'lm_dir': run.lm_dir, 'preempted_at': preempted}
