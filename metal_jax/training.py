"""Meta-training's library: optimizer, train state, the sharded jitted step, checkpoint I/O.

The run loop that drives them is metal_jax/run_train.py.

The train state is {'step', 'trainable', 'opt_state'}: only the trainable pytree
(LoRA + padding encoder) is differentiated and has optimizer state; the frozen
LM params are a separate, sharded argument of the step, never updated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from metal_jax import atomic, objective, pgm, sharding
from metal_jax.errors import UserError

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


def all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite (no NaN, no inf); integer leaves pass."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(pgm_cfg: pgm.PGMConfig, module, tx: optax.GradientTransformation,
                    accum_steps: int = 1, skip_nonfinite: bool = False) -> Callable:
  """step(state, params, batch, rng) -> (state, metrics); pure, to be jitted.

  metrics['nonfinite'] is 1.0 when the step's loss, gradient or updated state has a NaN or an
  inf (computed on the device: the host reads it with the other metrics, see run_train). With
  skip_nonfinite such a step is not applied: the trainable pytree and the optimizer state stay
  as they were (a select inside the step), only the step counter moves on.
  """

  def step(state, params, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
    grads, metrics = grads_and_metrics(pgm_cfg, module, params, state['trainable'], batch, rng,
                                       accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
              & all_finite(trainable) & all_finite(opt_state))
    metrics['nonfinite'] = jnp.logical_not(finite).astype(jnp.float32)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      trainable = jax.tree.map(keep, trainable, state['trainable'])
      opt_state = jax.tree.map(keep, opt_state, state['opt_state'])
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
                 param_shardings, steps: int, accum_steps: int = 1,
                 skip_nonfinite: bool = False) -> Trainer:
  """The optimizer of a `steps`-step run, its state initialiser and the sharded jitted step
  (skip_nonfinite: make_train_step's)."""
  schedule = make_schedule(optim_cfg, steps)
  tx = make_optimizer(optim_cfg, schedule)
  init_fn = lambda rng: init_state(pgm.init_trainable(rng, module.config, pgm_cfg), tx)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  step_fn = jit_train_step(make_train_step(pgm_cfg, module, tx, accum_steps, skip_nonfinite),
                           mesh, param_shardings, abstract)
  return Trainer(jax.jit(init_fn, out_shardings=sharding.replicated(mesh)), abstract, step_fn,
                 schedule, steps)


# ----------------------------------------------------------------------------- checkpoints

# The Orbax items of a checkpoint: the trainable pytree (all that eval and serving restore), the
# optimizer state, the data iterator's state and the run's config. The step is the checkpoint's.
ITEMS = ('trainable', 'opt_state', 'data', 'config')

# Written into a step's directory once Orbax has finished saving it (CheckpointSaver.finish): the
# sha256 and size of every other file there, checked (verify_checkpoint) before the step is used.
CHECKSUMS = 'metal_jax_checksums.json'
# Orbax's JSON metadata files: a step without CHECKSUMS (an older metal-jax's) must parse them.
_JSON_METADATA = ('_CHECKPOINT_METADATA', '_METADATA', 'metadata', '_sharding')


class ResumeError(UserError):
  """A run that cannot be resumed as configured; the message names the field or file."""


class NoCheckpoint(ResumeError, FileNotFoundError):
  """A workdir with no checkpoint to read (eval.py or serve.py before train.py)."""


class CheckpointIntegrityError(ResumeError):
  """A checkpoint that cannot be used: a file missing or differing from its checksum, metadata
  that does not parse, an item that does not restore, non-finite values. The message names the
  step and the path."""


class NonFiniteCheckpoint(CheckpointIntegrityError):
  """A checkpoint whose trainable pytree or optimizer state holds NaN or inf."""


class DivergenceError(UserError):
  """Training produced a non-finite loss, gradient or state; no checkpoint of it was written.
  The one-line message names the step and the last good checkpoint."""

  def __init__(self, step: int, last_good: int | None, directory: str, stopped_at: int):
    self.step, self.last_good, self.directory = step, last_good, directory
    where = (f'the last good checkpoint is step {last_good} in {directory}; rerunning resumes '
             'from it' if last_good is not None else f'no checkpoint was written in {directory}')
    seen = f' (seen at step {stopped_at})' if stopped_at != step else ''
    super().__init__(
        f'training diverged: non-finite loss or gradient at step {step}{seen}; stopped without '
        f'saving it: {where}. Lower --config.optim.lr or set --config.optim.clip_norm in a new '
        '--workdir, or rerun with --config.skip_nonfinite_steps=True to skip such steps.')


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
  """Orbax's save of the four items (no checksums: CheckpointSaver writes them once it is done)."""
  return mngr.save(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardSave(state['trainable']),
      opt_state=ocp.args.StandardSave(state['opt_state']),
      data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config_json)), force=force)


def step_dir(directory, step: int) -> str:
  return os.path.join(str(directory), str(step))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _step_files(root: str) -> list[str]:
  """Every file under a step directory (relative paths, sorted), but the checksums' own."""
  out = []
  for d, dirs, files in os.walk(root):
    dirs.sort()
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), root)
      if not rel.startswith(CHECKSUMS):
        out.append(rel)
  return sorted(out)


def write_checksums(directory, step: int) -> str | None:
  """CHECKSUMS of a finished save of `step` (atomically: a temporary file renamed); its path, or
  None when the step is gone (keep-N deleted it already)."""
  root = step_dir(directory, step)
  if not os.path.isdir(root):
    return None
  files = {rel: {'sha256': _sha256(os.path.join(root, rel)),
                 'size': os.path.getsize(os.path.join(root, rel))} for rel in _step_files(root)}
  path = os.path.join(root, CHECKSUMS)
  atomic.write(path, json.dumps({'format': 1, 'step': step, 'algorithm': 'sha256',
                                 'files': files}, indent=1, sort_keys=True), durable=True)
  return path


def verify_checkpoint(directory, step: int) -> bool:
  """True when every file of the step matches the checksums written with it; False when the step
  has none (an older metal-jax's, or a run stopped between the save and its checksums): then
  only Orbax's JSON metadata files are checked to parse. A file missing, of another size or
  other content raises CheckpointIntegrityError naming it and the step."""
  root = step_dir(directory, step)
  if not os.path.isdir(root):
    raise CheckpointIntegrityError(f'{root}: checkpoint step {step}: no such directory')
  path = os.path.join(root, CHECKSUMS)
  if not os.path.exists(path):
    for rel in _step_files(root):
      parts = rel.split(os.sep)
      if parts[-1] in _JSON_METADATA or 'array_metadatas' in parts[:-1]:
        try:
          with open(os.path.join(root, rel), 'rb') as f:
            json.loads(f.read())
        except (OSError, ValueError) as e:
          raise CheckpointIntegrityError(
              f'{os.path.join(root, rel)}: checkpoint step {step}: unreadable metadata '
              f'({type(e).__name__}: {_one_line(e)})') from None
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
    files = {rel: (int(v['size']), str(v['sha256'])) for rel, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointIntegrityError(f'{path}: checkpoint step {step}: unreadable checksums '
                                   f'({type(e).__name__}: {_one_line(e)})') from None
  for rel, (size, digest) in sorted(files.items()):
    p = os.path.join(root, rel)
    if not os.path.isfile(p):
      raise CheckpointIntegrityError(f'{p}: checkpoint step {step}: file missing')
    if os.path.getsize(p) != size:
      raise CheckpointIntegrityError(f'{p}: checkpoint step {step}: {os.path.getsize(p)} bytes, '
                                     f'{size} when written (truncated or overwritten)')
    if _sha256(p) != digest:
      raise CheckpointIntegrityError(f'{p}: checkpoint step {step}: contents differ from the '
                                     'sha256 written with the checkpoint (corrupted)')
  return True


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'


def refuse_nonfinite(tree, what: str, directory, step: int) -> None:
  """NonFiniteCheckpoint naming the step and path if a float leaf of `tree` has a NaN or inf."""
  if not bool(all_finite(tree)):
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
           and not bool(jnp.all(jnp.isfinite(x)))]
    raise NonFiniteCheckpoint(
        f'{step_dir(directory, step)}: checkpoint step {step}: the {what} holds non-finite values '
        f'(NaN or inf) in {", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""}: written by a '
        'diverged run; it is not used')


def use_checkpoint(mngr: ocp.CheckpointManager, step: int, restore_fn: Callable[[int], Any]):
  """restore_fn(step) after verify_checkpoint; a failure to restore is re-raised as
  CheckpointIntegrityError naming the step and path (a ResumeError about the layout or config
  passes as it is)."""
  root = step_dir(mngr.directory, step)
  if not verify_checkpoint(mngr.directory, step):
    log.warning('%s: checkpoint step %d has no checksums (written by an older metal-jax, or the '
                'run stopped before writing them): used unverified', root, step)
  try:
    return restore_fn(step)
  except ResumeError:
    raise
  except Exception as e:  # (Orbax, tensorstore and json raise many kinds)
    raise CheckpointIntegrityError(f'{root}: checkpoint step {step} does not restore: '
                                   f'{type(e).__name__}: {_one_line(e)}') from e


def newest_intact(mngr: ocp.CheckpointManager, steps: Sequence[int],
                  restore_fn: Callable[[int], Any], *, refuse: tuple = ()) -> tuple[int, Any]:
  """(step, restore_fn(step)) for the newest of `steps` that verifies and restores. A broken one
  is reported (a warning naming its path and step) and the next older one is tried; if none is
  intact, one ResumeError names them all. An error of a class in `refuse` is raised at once."""
  broken = []
  for step in sorted(steps, reverse=True):
    try:
      return step, use_checkpoint(mngr, step, restore_fn)
    except CheckpointIntegrityError as e:
      if isinstance(e, refuse):
        raise
      log.warning('broken checkpoint, trying the next older one: %s', e)
      broken.append(str(e))
  if not broken:
    raise NoCheckpoint(f'{mngr.directory}: no checkpoint')
  raise ResumeError(f'{mngr.directory}: no intact checkpoint ({len(broken)} tried): ' +
                    ' | '.join(broken))


def set_aside(mngr: ocp.CheckpointManager, steps: Sequence[int]) -> list[str]:
  """Moves the (broken) checkpoints `steps` out of the manager's directory, into
  DIRECTORY.broken/, so that the resumed run writes those steps again; returns where they went.
  Process 0 moves them; every process then rereads the directory."""
  moved = []
  if jax.process_index() == 0:
    for step in sorted(steps):
      src = step_dir(mngr.directory, step)
      if not os.path.isdir(src):
        continue
      dst_root = f'{mngr.directory}.broken'
      os.makedirs(dst_root, exist_ok=True)
      dst, i = os.path.join(dst_root, str(step)), 1
      while os.path.exists(dst):
        dst, i = os.path.join(dst_root, f'{step}.{i}'), i + 1
      shutil.move(src, dst)
      moved.append(dst)
      log.warning('moved the broken checkpoint step %d to %s (the run will write step %d again)',
                  step, dst, step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('metal_jax: broken checkpoints set aside')
  mngr.reload()
  return moved


class CheckpointSaver:
  """A run's saves: Orbax's (async ones finish in the background), then, once a save has
  finished, its checksums (process 0). `finish` waits for the saves in flight and writes theirs:
  call it before raising out of the loop and at the end."""

  def __init__(self, mngr: ocp.CheckpointManager, async_save: bool):
    self.mngr, self.async_save, self.unsummed = mngr, async_save, []

  def save(self, step: int, state, data_state: dict, config_json: dict) -> bool:
    """Saves `step` (the caller has decided to: mngr.should_save, or a forced save), after
    finishing the previous save (Orbax's save waits for it anyway)."""
    self.finish()
    saved = save_checkpoint(self.mngr, step, state, data_state, config_json, force=True)
    if saved:
      self.unsummed.append(step)
      if not self.async_save:
        self.finish()
    return saved

  def finish(self) -> None:
    if not self.unsummed:
      return
    self.mngr.wait_until_finished()
    if jax.process_index() == 0:
      for step in self.unsummed:
        write_checksums(self.mngr.directory, step)
    self.unsummed.clear()


def _check_layout(mngr: ocp.CheckpointManager, step: int) -> None:
  if os.path.isdir(os.path.join(str(mngr.directory), str(step), 'state')):
    raise ResumeError(f'{mngr.directory}/{step}: written by an older metal-jax (one "state" '
                      f'item); this version reads the items {ITEMS}. Retrain in a new --workdir.')


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(train state, data-iterator state) at `step`, into `abstract_state`'s shapes and shardings.
  A state with non-finite values is refused (NonFiniteCheckpoint)."""
  _check_layout(mngr, step)
  restored = mngr.restore(step, args=ocp.args.Composite(
      trainable=ocp.args.StandardRestore(abstract_state['trainable']),
      opt_state=ocp.args.StandardRestore(abstract_state['opt_state']),
      data=ocp.args.JsonRestore()))
  refuse_nonfinite(restored['trainable'], 'trainable pytree', mngr.directory, step)
  refuse_nonfinite(restored['opt_state'], 'optimizer state', mngr.directory, step)
  step_sh = getattr(abstract_state['step'], 'sharding', None)
  state = {'step': jax.device_put(jnp.asarray(step, jnp.int32), step_sh),
           'trainable': restored['trainable'], 'opt_state': restored['opt_state']}
  return state, restored['data']


def _read_manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise NoCheckpoint(f'{directory}: no checkpoints (run train.py --workdir={workdir} first)')
  return checkpoint_manager(directory, read_only=True)


def _read(workdir: str, step: int | None, restore_fn: Callable, refuse: tuple = ()):
  """(restore_fn(mngr, s), s): s = `step` (verified), or else the newest intact checkpoint."""
  mngr = _read_manager(workdir)
  try:
    fn = functools.partial(restore_fn, mngr)
    if step is not None:
      return use_checkpoint(mngr, step, fn), step
    steps = mngr.all_steps()
    if not steps:
      raise NoCheckpoint(f'{mngr.directory}: no checkpoint (run train.py --workdir={workdir} '
                              'first)')
    step, out = newest_intact(mngr, steps, fn, refuse=refuse)
    return out, step
  finally:
    mngr.close()


def restore_trainable(workdir: str, lm_config, pgm_cfg: pgm.PGMConfig,
                      step: int | None = None) -> tuple[dict, int]:
  """The trainable pytree alone of a run's checkpoint (the newest intact one, or `step`): eval,
  serving. A broken checkpoint is skipped (newest intact) or refused (`step`) naming it; one with
  non-finite values is refused (NonFiniteCheckpoint) either way."""
  abstract = jax.eval_shape(lambda: pgm.init_trainable(jax.random.key(0), lm_config, pgm_cfg))

  def restore(mngr, s):
    _check_layout(mngr, s)
    tr = mngr.restore(s, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(abstract)))['trainable']
    refuse_nonfinite(tr, 'trainable pytree', mngr.directory, s)
    return tr

  return _read(workdir, step, restore, refuse=(NonFiniteCheckpoint,))


def restore_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The config JSON a run saved with its checkpoint (the newest intact one, or `step`)."""
  return _read(workdir, step, saved_config)


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config JSON item of the checkpoint at `step`."""
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


# Config fields a resumed run may change: they affect neither the numbers, the data order nor the
# layout of the checkpointed pytrees. (scan_layers is not one: it stacks the LoRA pytree's layers.)
# skip_nonfinite_steps changes only steps that, without it, stop the run unsaved: a diverged run
# resumes from its last good checkpoint with it set.
RESUMABLE_CHANGES = ('stop_at', 'log_every', 'progress', 'save_every', 'keep_checkpoints',
                     'async_checkpoints', 'distributed', 'coordinator_address', 'num_processes',
                     'process_id', 'mesh', 'remat', 'eval', 'prefetch', 'skip_nonfinite_steps',
                     'buckets_per_octave')
# Fields added after runs were saved, with the value a config written before them meant: a
# checkpoint without one resumes (and is evaluated) as it was trained.
ADDED_FIELDS = {'prompt_chunks': 1, 'queries_per_episode': 1, 'buckets_per_octave': 1}


def config_field(config, name: str):
  """config[name], or for an ADDED_FIELDS name missing from an older run's config, its value."""
  return config.get(name, ADDED_FIELDS[name])


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
  a, b = {**ADDED_FIELDS, **flat(saved)}, {**ADDED_FIELDS, **flat(current)}
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
