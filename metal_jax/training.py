"""Meta-training: the train state, the sharded jitted step, checkpoints, the loop.

The train state is {'step', 'trainable', 'opt_state'}: only the trainable pytree
(LoRA + padding encoder) is differentiated and has optimizer state; the frozen
LM params are a separate, sharded argument of the step, never updated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from metal_jax import objective, pgm, sharding

log = logging.getLogger('metal_jax')


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  lr: float = 2e-4
  end_lr: float = 0.0  # linear decay from lr to end_lr over the run
  warmup_steps: int = 0  # the paper uses none
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 0.0  # 0: no clipping
  accum_steps: int = 1  # micro-batches per step (gradient accumulation)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear decay from lr to end_lr, after an optional linear warmup."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  schedule = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
  if cfg.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), schedule], [cfg.warmup_steps])
  return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW on make_schedule, with optional global-norm clipping."""
  schedule = make_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def init_state(trainable: dict, tx: optax.GradientTransformation) -> dict:
  return {'step': jnp.zeros((), jnp.int32), 'trainable': trainable,
          'opt_state': tx.init(trainable)}


def split_micro(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...], micro-batch a taking rows a, a+n, ... (balanced across shards)."""
  def f(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f'batch size {b} is not divisible by accum_steps={n}')
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(f, batch)


def grads_and_metrics(pgm_cfg: pgm.PGMConfig, module, params, trainable, batch, rng,
                      accum_steps: int = 1):
  """Gradient of the token-mean NLL w.r.t. the trainable pytree, exact under accumulation."""
  grad_fn = jax.value_and_grad(
      lambda tr, b, r: objective.nll_sum(pgm_cfg, module, params, tr, b, rng=r, train=True),
      has_aux=True)
  if accum_steps == 1:
    (total, count), g = grad_fn(trainable, batch, rng)
  else:
    micro = split_micro(batch, accum_steps)

    def body(carry, xs):
      g_acc, tot_acc, cnt_acc = carry
      mb, i = xs
      (tot, cnt), g = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, g_acc, g), tot_acc + tot, cnt_acc + cnt), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (g, total, count), _ = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros(())), (micro, jnp.arange(accum_steps)))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda x: x / denom, g)
  return grads, {'loss': total / denom, 'target_tokens': count}


def make_train_step(pgm_cfg: pgm.PGMConfig, module, tx: optax.GradientTransformation,
                    accum_steps: int = 1) -> Callable:
  """step(state, params, batch, rng) -> (state, metrics); pure, to be jitted."""

  def step(state, params, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
    grads, metrics = grads_and_metrics(pgm_cfg, module, params, state['trainable'], batch, rng,
                                       accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return {'step': state['step'] + 1, 'trainable': trainable, 'opt_state': opt_state}, metrics

  return step


def jit_train_step(step_fn: Callable, mesh: Mesh, param_shardings, state) -> Callable:
  """One jax.jit with in/out shardings and the state donated."""
  rep = sharding.replicated(mesh)
  state_sh = jax.tree.map(lambda _: rep, state)
  return jax.jit(step_fn,
                 in_shardings=(state_sh, param_shardings, sharding.batch_sharding(mesh), rep),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(directory: str, save_every: int, keep: int,
                       async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'config'))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state, data_state: dict,
                    config_json: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config_json)), force=force)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def restore_trainable(workdir: str, lm_config, pgm_cfg: pgm.PGMConfig, optim_cfg: OptimConfig,
                      step: int | None = None) -> tuple[dict, int]:
  """The trainable pytree of a run's checkpoint (the latest, or `step`), for evaluation/serving."""
  directory = os.path.join(workdir, 'checkpoints')
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'data', 'config'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory}: no checkpoint to evaluate (run train.py first)')
  tx = make_optimizer(optim_cfg, 1)
  abstract = jax.eval_shape(
      lambda: init_state(pgm.init_trainable(jax.random.key(0), lm_config, pgm_cfg), tx))
  state, _ = restore_checkpoint(mngr, step, abstract)
  mngr.close()
  return state['trainable'], step


def restore_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The config JSON a run saved with its checkpoint (the latest, or `step`)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no checkpoints (run train.py --workdir={workdir} first)')
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'data', 'config'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory}: no checkpoint (run train.py --workdir={workdir} first)')
  cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  mngr.close()
  return cfg, step


# Config fields a resumed run may change: they affect neither the numbers nor the data order.
RESUMABLE_CHANGES = ('stop_at', 'log_every', 'progress', 'save_every', 'keep_checkpoints',
                     'async_checkpoints', 'distributed', 'coordinator_address', 'num_processes',
                     'process_id', 'mesh', 'remat', 'scan_layers', 'eval')


def check_resume_config(saved: dict, current: dict, directory: str) -> None:
  """Refuses to resume under a config that would change the schedule, data or model."""
  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f'{prefix}{k}.'))
      else:
        out[f'{prefix}{k}'] = v
    return out
  a, b = flat(saved), flat(current)
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                   and k.split('.')[0] not in RESUMABLE_CHANGES)
  if changed:
    raise ValueError(
        f'{directory}: the checkpoint was written under a different config; changed: ' +
        ', '.join(f'{k} ({a.get(k)!r} -> {b.get(k)!r})' for k in changed[:8]) +
        '. Use a new --workdir, or rerun with the original values.')


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) to restore into."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, 'sharding', None), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


# ----------------------------------------------------------------------------- metrics


class MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard event files; a no-op off process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    from tensorboardX import SummaryWriter
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
  """On resume, drop metric rows past the restored step (they will be written again)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)['step'] <= after_step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(rows)
  os.replace(tmp, path)


def timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


__all__ = ['OptimConfig', 'make_optimizer', 'init_state', 'make_train_step', 'jit_train_step',
           'checkpoint_manager', 'save_checkpoint', 'restore_checkpoint', 'MetricWriter',
           'grads_and_metrics', 'np']


# ----------------------------------------------------------------------------- the loop


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


def train(config, workdir: str) -> dict:
  """Meta-trains the PGM (Equation 1) as `config` says; resumes from `workdir` by itself.

  Returns a summary (final step, last loss, timings). Only process 0 logs and
  writes metrics; Orbax coordinates checkpoint writes across processes.
  """
  from tqdm import tqdm

  from metal_jax import experiment
  from metal_jax.data.episodes import EpisodeSampler

  if config.distributed:
    initialize_distributed(config)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  run = experiment.setup(config, workdir)
  tasks, mesh, lm, spec, pgm_cfg = run.tasks, run.mesh, run.lm, run.spec, run.pgm_cfg

  sampler = EpisodeSampler(tasks, spec, config.batch_size, config.seed,
                           jax.process_index(), jax.process_count())
  steps = config.num_steps or max(
      config.epochs * sampler.episodes_per_epoch // config.batch_size, 1)
  optim_cfg = experiment.optim_config(config)
  tx, schedule = make_optimizer(optim_cfg, steps), make_schedule(optim_cfg, steps)
  rep = sharding.replicated(mesh)
  init_fn = lambda rng: init_state(pgm.init_trainable(rng, lm.config, pgm_cfg), tx)
  state = jax.jit(init_fn, out_shardings=rep)(jax.random.key(config.seed))
  step_fn = jit_train_step(
      make_train_step(pgm_cfg, lm.module, tx, config.optim.accum_steps), mesh, run.param_shardings,
      state)

  mngr = checkpoint_manager(os.path.join(workdir, 'checkpoints'), config.save_every,
                            config.keep_checkpoints, async_save=config.async_checkpoints)
  cfg_json = experiment.config_json(config)
  start = mngr.latest_step()
  if start is not None:
    saved_cfg = mngr.restore(start, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    check_resume_config(saved_cfg, cfg_json, str(mngr.directory))
    state, data_state = restore_checkpoint(mngr, start, abstract_like(state))
    sampler.restore(data_state, where=str(mngr.directory))
    if lead:
      truncate_metrics(workdir, start)
      log.info('resuming from the checkpoint at step %d in %s', start, mngr.directory)
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
  with PreemptionWatch() as watch:
    for s in bar:
      if s >= stop:  # a time-boxed job: stop here, resume later with the same config
        break
      local = next(sampler)
      batch = sharding.global_batch(local, mesh)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, lm.params, batch, rng)
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        window_t = time.perf_counter()
      window_tokens += int(local['pgm_mask'].sum() + local['lm_mask'].sum()) * jax.process_count()
      preempt = watch.signalled
      save_checkpoint(mngr, s + 1, state, sampler.state(), cfg_json,
                      force=s + 1 == stop or preempt)
      if (s + 1) % config.log_every == 0 or s + 1 == stop or preempt:
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - window_t
        last = {**{k: float(v) for k, v in metrics.items()},
                'tokens_per_s': window_tokens / max(dt, 1e-9),
                'lr': float(schedule(s))}
        writer.write(s + 1, last)
        bar.set_postfix(loss=f'{last["loss"]:.4f}', tok_s=f'{last["tokens_per_s"]:.0f}')
        window_tokens, window_t = 0, time.perf_counter()
      if preempt:
        preempted = s + 1
        if lead:
          log.info('preempted: saved the checkpoint at step %d in %s; rerun the same command to '
                   'resume', preempted, mngr.directory)
        break
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return {'steps': steps, 'last': last, 'compile_s': compile_s, 'counts': counts,
          'checkpoint_dir': str(mngr.directory), 'lm_dir': run.lm_dir, 'preempted_at': preempted}

