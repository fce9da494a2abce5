"""MetaPrompting (Hou et al. 2022): SoftPrompt with a meta-learned initialisation.

The prompt is SoftPrompt's, P input embeddings [P, D] before the bare input, the LM frozen; only
its initialisation differs. It is meta-trained on the meta-train tasks (meta_train) with
first-order MAML (FOMAML, MetaPrompting's efficient variant), starting from sampled vocabulary
rows (soft_prompt.init_from_vocab). An outer step draws `meta_batch_tasks` tasks and, from each,
disjoint support and query examples; `inner_steps` steps of plain SGD on the support batch adapt
the prompt, and the task's outer gradient is the query loss's gradient AT THE ADAPTED PROMPT (the
second-order terms through the inner loop are dropped). Adam applies the mean over the tasks to
the initialisation. A test task then adapts the meta-learned initialisation as meta-training
taught it to be adapted (run): the inner loop itself, `test_steps` (default inner_steps, 5) SGD
steps at inner_lr on its 16 examples, 5 forward + 5 backward passes, within SoftPrompt's budget of
10 + 10. SoftPrompt's own recipe (AdamW at lr 4e-5, 10 steps) moves an entry by at most 4e-4
against entries of ~0.07: it would score the init almost as it is, while MAML optimises the init
for adaptation by the inner loop, not for use as it is (on the built-in default, held-out tasks'
unadapted query loss rises 6.3 -> 7.3 with meta-training while the adapted one falls 1.3 -> 0.9;
with SoftPrompt's recipe test-task accuracy at seed 100 was 32%, the vocabulary init's 24%).

Cost in LM passes over a batch (support_size or query_size examples), per outer step and task:
inner_steps forward + backward passes on the support batch, one forward pass for the query loss
before adaptation (a diagnostic) and one forward + backward at the adapted prompt, so
  forward passes  = meta_steps * meta_batch_tasks * (inner_steps + 2)
  backward passes = meta_steps * meta_batch_tasks * (inner_steps + 1).
The defaults: 200 * 4 * 7 = 5,600 forward and 4,800 backward passes, paid once for all test tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metal_jax import atomic, objective
from metal_jax.baselines import common, soft_prompt
from metal_jax.data.episodes import PAD_ID, EpisodeSpec
from metal_jax.data.tasks import TokenizedTask

META_KEYS = ('hparams', 'n_tasks', 'fingerprints')  # what save_init's meta must record


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams:
  """Meta-training, then the per-task adaptation (test_steps of the inner loop); SoftPrompt's
  prompt length.

  The learning rates were chosen on the built-in default (its base LM, 400 of its meta-train
  tasks, 200 steps; the query loss after adaptation on 64 held-out tasks, from the vocabulary
  init -> from the meta-learned one): inner 0.3 / outer 3e-3 gave 1.31 -> 0.89; inner 1.0 / outer
  1e-2 2.83 -> 1.27; inner 0.1 / outer 1e-2 2.12 -> 2.01, its unadapted loss diverging (6 -> 13).
  """
  prompt_len: int = 20  # SoftPrompt's
  meta_steps: int = 200  # outer steps; ~1 s each for the built-in default on 2 CPU cores
  meta_batch_tasks: int = 4  # tasks per outer step
  inner_steps: int = 5  # few inner steps, as MetaPrompting
  # Plain SGD on the [P, D] embeddings: on the built-in LM the loss's gradient entries are ~2e-2,
  # so a step moves an entry by ~6e-3, a tenth of the embedding entries' scale (~0.07).
  inner_lr: float = 0.3
  outer_lr: float = 3e-3  # Adam on the init: ~3e-3 per entry a step, entries ~0.07
  support_size: int = 16  # as the test tasks' few-shot sets
  query_size: int = 16
  test_steps: int = 0  # a test task's adaptation: SGD steps at inner_lr; 0: inner_steps


def _loss(module, params: dict, embeds: jax.Array, batch: dict) -> jax.Array:
  """The frozen LM's mean y-token NLL of an LM half under the prompt embeds [P, D]."""
  return objective.mean_nll(module, params, soft_prompt.EmbedsPrompt()({'embeds': embeds}), batch)


def task_gradient(module, params: dict, embeds: jax.Array, support: dict, query: dict,
                  inner_lr, inner_steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One task's FOMAML step from embeds [P, D]: (query loss before adaptation, after adaptation,
  the query loss's gradient [P, D] at the adapted prompt).

  The adapted prompt is inner_steps of SGD, p <- p - inner_lr * grad_p support_loss(p).
  """
  adapted, _ = adapt(module, params, embeds, support, inner_lr, inner_steps)
  after, grad = jax.value_and_grad(_loss, argnums=2)(module, params, adapted, query)
  return _loss(module, params, embeds, query), after, grad


def adapt(module, params: dict, embeds: jax.Array, batch: dict, lr, steps: int
          ) -> tuple[jax.Array, jax.Array]:
  """The inner loop: `steps` of SGD on the batch's loss from embeds [P, D]; (the adapted
  embeddings, the loss before each step [steps])."""
  def sgd(p, _):
    loss, g = jax.value_and_grad(_loss, argnums=2)(module, params, p, batch)
    return p - lr * g, loss

  return jax.lax.scan(sgd, embeds, None, length=steps)


_adapt = jax.jit(adapt, static_argnames=('module', 'steps'))


@functools.partial(jax.jit, static_argnames=('module', 'inner_steps'))
def meta_gradient(module, params: dict, embeds: jax.Array, support: dict, query: dict, inner_lr,
                  inner_steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FOMAML over M tasks (support and query [M, B, T] / [M, B, Y], one task a row): the query
  losses before and after adaptation [M] and the mean outer gradient [P, D]."""
  per_task = functools.partial(task_gradient, module, params, embeds, inner_steps=inner_steps)
  before, after, grads = jax.vmap(per_task, in_axes=(0, 0, None))(support, query, inner_lr)
  return before, after, grads.mean(0)


@functools.partial(jax.jit, static_argnames=('module', 'inner_steps'))
def _outer_step(module, params, embeds, opt_state, support, query, inner_lr, outer_lr,
                inner_steps):
  before, after, grad = meta_gradient(module, params, embeds, support, query, inner_lr,
                                      inner_steps)
  updates, opt_state = optax.adam(outer_lr).update(grad, opt_state)
  return optax.apply_updates(embeds, updates), opt_state, before.mean(), after.mean()


def stacked_batches(tasks: Sequence[TokenizedTask], idx: Sequence[Sequence[int]],
                    spec: EpisodeSpec) -> dict:
  """common.train_batch of examples idx[m] of tasks[m], for every m, stacked [M, B, ...].

  Each batch is padded further to the longest one's (bucketed) lengths, as collate_lm pads: ids
  with PAD_ID, masks and positions with 0. One compiled step then serves tasks whose own buckets
  differ.
  """
  batches = [{k: np.asarray(v) for k, v in common.train_batch(t, i, spec).items()}
             for t, i in zip(tasks, idx)]
  out = {}
  for k in batches[0]:
    width = max(b[k].shape[1] for b in batches)
    fill = PAD_ID if k.endswith('_ids') else 0
    out[k] = jnp.asarray(np.stack([np.pad(b[k], ((0, 0), (0, width - b[k].shape[1])),
                                          constant_values=fill) for b in batches]))
  return out


def sample_episodes(tasks: Sequence[TokenizedTask], hp: Hparams, gen: np.random.Generator
                    ) -> tuple[list[TokenizedTask], list[np.ndarray], list[np.ndarray]]:
  """One outer step's draw: meta_batch_tasks tasks (distinct while there are enough) and, from
  each, disjoint support and query examples: (tasks, support idx, query idx)."""
  picks = gen.choice(len(tasks), hp.meta_batch_tasks, replace=len(tasks) < hp.meta_batch_tasks)
  chosen, support, query = [], [], []
  for t in picks:
    idx = gen.choice(len(tasks[t]), hp.support_size + hp.query_size, replace=False)
    chosen.append(tasks[t])
    support.append(idx[:hp.support_size])
    query.append(idx[hp.support_size:])
  return chosen, support, query


def meta_train(module, params: dict, tasks: Sequence[TokenizedTask], spec: EpisodeSpec,
               hp: Hparams, *, rng) -> tuple[jax.Array, list[float], dict]:
  """Meta-trains the prompt initialisation with FOMAML on `tasks`; deterministic given rng.

  Returns (init_embeds [P, D] float32; the mean query loss after adaptation of every outer step;
  stats: forward_passes and backward_passes spent (the module docstring's formulas) and
  query_loss_before, the mean query loss before adaptation of every outer step).
  """
  need = hp.support_size + hp.query_size
  small = [t.path for t in tasks if len(t) < need]
  if not tasks or small:
    raise ValueError(f'metaprompting: meta-training needs tasks of at least support_size + '
                     f'query_size = {need} examples; too small: {small or "(no tasks)"}')
  r_init, r_sample = jax.random.split(common.as_key(rng))
  embeds = soft_prompt.init_from_vocab(r_init, module, params, hp.prompt_len)
  spec = spec.with_prompt_len(hp.prompt_len)
  gen = common.np_rng(r_sample)
  opt_state = optax.adam(hp.outer_lr).init(embeds)
  inner_lr, outer_lr = jnp.float32(hp.inner_lr), jnp.float32(hp.outer_lr)
  before, after = [], []
  for _ in range(hp.meta_steps):
    chosen, support_idx, query_idx = sample_episodes(tasks, hp, gen)
    embeds, opt_state, lb, la = _outer_step(
        module, params, embeds, opt_state, stacked_batches(chosen, support_idx, spec),
        stacked_batches(chosen, query_idx, spec), inner_lr, outer_lr, hp.inner_steps)
    before.append(lb)  # read at the end: the next step's batches are built while this one runs
    after.append(la)
  per_task = hp.meta_steps * hp.meta_batch_tasks
  stats = {'forward_passes': per_task * (hp.inner_steps + 2),
           'backward_passes': per_task * (hp.inner_steps + 1),
           'query_loss_before': [float(x) for x in before]}
  return embeds, [float(x) for x in after], stats


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng, init_embeds: jax.Array) -> common.TuneResult:
  """The meta-learned init_embeds [P, D] adapted to the examples idx by the inner loop
  (test_steps SGD steps at inner_lr, the whole batch each: one forward + one backward pass a
  step); `losses` the loss before each step. Deterministic (`rng` is unused: no sampling)."""
  del rng
  if init_embeds.shape[0] != hp.prompt_len:
    raise ValueError(f'metaprompting: init_embeds has {init_embeds.shape[0]} positions, '
                     f'prompt_len is {hp.prompt_len}')
  steps = hp.test_steps or hp.inner_steps
  batch = common.train_batch(task, idx, spec.with_prompt_len(hp.prompt_len))
  adapted, losses = _adapt(module, params, jnp.asarray(init_embeds, jnp.float32), batch,
                           jnp.float32(hp.inner_lr), steps)
  return common.TuneResult(prompt=soft_prompt.EmbedsPrompt()({'embeds': adapted}),
                           forward_passes=steps, backward_passes=steps,
                           losses=[float(x) for x in losses])


# ----------------------------------------------------------------------------- the cached init


def init_meta(hp: Hparams, tasks: Sequence[TokenizedTask], **extra) -> dict:
  """What a cached init was meta-trained from: hparams, the number of meta-train tasks and their
  fingerprints (file name, content + tokenizer key, examples), plus the caller's `extra` (seed,
  model): a cache whose meta differs from the current one is stale."""
  prints = [f'{os.path.basename(t.path)}:{t.fingerprint}:{len(t)}' for t in tasks]
  return {'hparams': dataclasses.asdict(hp), 'n_tasks': len(tasks), 'fingerprints': prints,
          **extra}


def save_init(path: str, init_embeds: jax.Array, meta: dict) -> None:
  """Writes init_embeds [P, D] and meta (JSON, init_meta's keys at least) to one .npz atomically."""
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ValueError(f'metaprompting.save_init: meta lacks {missing} (build it with init_meta)')
  atomic.write_npz(path, init_embeds=np.asarray(init_embeds, np.float32),
                   meta=np.asarray(json.dumps(meta)))


def load_init(path: str) -> tuple[jax.Array, dict]:
  """(init_embeds [P, D] float32, meta) as save_init wrote them."""
  with np.load(path) as f:
    return jnp.asarray(f['init_embeds']), json.loads(str(f['meta']))
