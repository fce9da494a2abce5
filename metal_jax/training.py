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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear decay (optionally after a linear warmup) and optional clipping."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  schedule = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
  if cfg.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), schedule], [cfg.warmup_steps])
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
    metrics['grad_norm'] = optax.global_norm(grads)
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
