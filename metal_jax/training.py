"""Meta-training's library: optimizer, train state, the sharded jitted step, checkpoint I/O.

The run loop that drives them is metal_jax/run_train.py.

The train state is {'step', 'trainable', 'opt_state'}: only the trainable pytree
(LoRA + padding encoder) is differentiated and has optimizer state; the frozen
LM params are a separate, sharded argument of the step, never updated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from metal_jax import objective, pgm, sharding


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


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW on `schedule` (make_schedule), with optional global-norm clipping."""
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
  """One jax.jit with in/out shardings and the state donated, traced on the mesh (so activations
  are constrained by the logical rules: sharding.constrain)."""
  rep = sharding.replicated(mesh)
  state_sh = jax.tree.map(lambda _: rep, state)
  return jax.jit(sharding.on_mesh(step_fn, mesh),
                 in_shardings=(state_sh, param_shardings, sharding.batch_sharding(mesh), rep),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))


@dataclasses.dataclass
class Trainer:
  """A run's optimizer schedule, state initialiser and jitted step: what train.py's loop, the
  step benchmark and bench/scale.py's compile-only sizing all use."""
  init: Callable  # rng -> {'step', 'trainable', 'opt_state'}, replicated on the mesh (jitted)
  abstract_state: Any  # the state's ShapeDtypeStructs (jax.eval_shape of init)
  step_fn: Callable  # jitted (state, params, batch, rng) -> (state, metrics), state donated
  schedule: optax.Schedule
  steps: int


def make_trainer(optim_cfg: OptimConfig, pgm_cfg: pgm.PGMConfig, module, mesh: Mesh,
                 param_shardings, steps: int, accum_steps: int = 1) -> Trainer:
  """The optimizer of a `steps`-step run, its state initialiser and the sharded jitted step."""
  schedule = make_schedule(optim_cfg, steps)
  tx = make_optimizer(optim_cfg, schedule)
  init_fn = lambda rng: init_state(pgm.init_trainable(rng, module.config, pgm_cfg), tx)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  step_fn = jit_train_step(make_train_step(pgm_cfg, module, tx, accum_steps), mesh,
                           param_shardings, abstract)
  return Trainer(jax.jit(init_fn, out_shardings=sharding.replicated(mesh)), abstract, step_fn,
                 schedule, steps)


# ----------------------------------------------------------------------------- checkpoints

# The Orbax items of a checkpoint: the trainable pytree (all that eval and serving restore), the
# optimizer state, the data iterator's state and the run's config. The step is the checkpoint's.
ITEMS = ('trainable', 'opt_state', 'data', 'config')


class ResumeError(ValueError):
  """A run that cannot be resumed as configured; the message names the field or file."""


def checkpoint_manager(directory: str, *, save_every: int = 1, keep: int | None = None,
                       async_save: bool = False, read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """The one place a run's checkpoint manager is built (training writes, eval/serving read)."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                         enable_async_checkpointing=async_save,
                                         create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state, data_state: dict,
                    config_json: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardSave(state['trainable']),
      opt_state=ocp.args.StandardSave(state['opt_state']),
      data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config_json)), force=force)


def _check_layout(mngr: ocp.CheckpointManager, step: int) -> None:
  if os.path.isdir(os.path.join(str(mngr.directory), str(step), 'state')):
    raise ResumeError(f'{mngr.directory}/{step}: written by an older metal-jax (one "state" '
                      f'item); this version reads the items {ITEMS}. Retrain in a new --workdir.')


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(train state, data-iterator state) at `step`, into `abstract_state`'s shapes and shardings."""
  _check_layout(mngr, step)
  restored = mngr.restore(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardRestore(abstract_state['trainable']),
      opt_state=ocp.args.StandardRestore(abstract_state['opt_state']),
      data=ocp.args.JsonRestore()))
  step_sh = getattr(abstract_state['step'], 'sharding', None)
  state = {'step': jax.device_put(jnp.asarray(step, jnp.int32), step_sh),
           'trainable': restored['trainable'], 'opt_state': restored['opt_state']}
  return state, restored['data']


def _read_manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no checkpoints (run train.py --workdir={workdir} first)')
  return checkpoint_manager(directory, read_only=True)


def _step_or_latest(mngr: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{mngr.directory}: no checkpoint (run train.py --workdir={workdir} '
                            'first)')
  return step


def restore_trainable(workdir: str, lm_config, pgm_cfg: pgm.PGMConfig,
                      step: int | None = None) -> tuple[dict, int]:
  """The trainable pytree alone of a run's checkpoint (the latest, or `step`): eval, serving."""
  mngr = _read_manager(workdir)
  step = _step_or_latest(mngr, workdir, step)
  _check_layout(mngr, step)
  abstract = jax.eval_shape(lambda: pgm.init_trainable(jax.random.key(0), lm_config, pgm_cfg))
  trainable = mngr.restore(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardRestore(abstract)))['trainable']
  mngr.close()
  return trainable, step


def restore_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The config JSON a run saved with its checkpoint (the latest, or `step`)."""
  mngr = _read_manager(workdir)
  step = _step_or_latest(mngr, workdir, step)
  cfg = saved_config(mngr, step)
  mngr.close()
  return cfg, step


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config JSON item of the checkpoint at `step`."""
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


# Config fields a resumed run may change: they affect neither the numbers, the data order nor the
# layout of the checkpointed pytrees. (scan_layers is not one: it stacks the LoRA pytree's layers.)
RESUMABLE_CHANGES = ('stop_at', 'log_every', 'progress', 'save_every', 'keep_checkpoints',
                     'async_checkpoints', 'distributed', 'coordinator_address', 'num_processes',
                     'process_id', 'mesh', 'remat', 'eval', 'prefetch')


def check_resume_config(saved: dict, current: dict, directory: str) -> None:
  """Refuses to resume under a config that would change the schedule, data, model or layout."""
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
    raise ResumeError(
        f'{directory}: the checkpoint was written under a different config; changed: ' +
        ', '.join(f'{k} ({a.get(k)!r} -> {b.get(k)!r})' for k in changed[:8]) +
        '. Use a new --workdir, or rerun with the original values.')


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) to restore into."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, 'sharding', None), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
