"""AutoPrompt (Shin et al. 2020): a gradient-guided search over P discrete trigger tokens.

The prompt is P vocabulary tokens before the input: Prompt(embeds=table[ids][None],
tokens=ids[None]), the LM frozen. Each iteration (the reference's `run_model` loop,
ucinlp/autoprompt create_trigger.py) picks a random trigger position, takes the gradient g
[D] of the loss w.r.t. that position's input embedding (one forward + one backward pass),
ranks every vocabulary token w by the first-order loss change e_w . g (HotFlip; the
reference's `hotflip_attack`: top-k of table @ -g), evaluates the top `num_cand` candidates
(the trigger with that position replaced: one LM forward pass over the batch each) and keeps
the best one if it lowers the loss, else the current trigger. The loss is objective.mean_nll,
the mean NLL of y over the few-shot examples, the loss every baseline tunes. One jitted call
an iteration (`search_step`) does all three.

Adaptation to this setting:
  * the few-shot batch is both the reference's gradient minibatches and its evaluation
    minibatches, so the current trigger's loss is already known (the gradient pass's forward
    at the first iteration, the kept loss afterwards) and is not evaluated again;
  * candidates are ranked by the loss (the reference ranks them by its metric: accuracy
    given a label map, else the label's log-likelihood);
  * the kept trigger is the last one (the reference keeps the best on a dev set; the 16
    examples leave none, as for every baseline here); its loss never rises;
  * candidates exclude the config's bos/eos ids (GPT-2's pad too) and ids >= `vocab_limit`
    (the tokenizer's size when the embedding table is padded beyond it: run() sees no
    tokenizer); the reference's --filter also drops label words and capitalised words;
  * the trigger starts as P copies of `init_token`, by default the eos token: a causal LM has
    no [MASK], the reference's start, and like [MASK] eos is never a candidate.

Budget: forward_passes = iters * (1 + num_cand), backward_passes = iters. Defaults: the
reference's num_cand 10; 32 iterations (352 forward + 32 backward passes, between SoftPrompt's
10 + 10 and BBTv2's 3,840 forward passes); 10 trigger tokens, half the gradient baselines' 20
so that a random position comes up about 3 times in 32 iterations (the reference's templates
use 3 to 5).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import objective
from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.pgm import Prompt


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams:
  """10 trigger tokens, 32 iterations of 10 candidates (the reference's num_cand)."""
  prompt_len: int = 10
  iters: int = 32
  num_cand: int = 10
  init_token: int = -1  # the trigger's initial id at every position; -1: the config's eos (or 0)
  vocab_limit: int = 0  # candidates are ids < vocab_limit; 0: the whole embedding table


def trigger_prompt(table: jax.Array, ids: jax.Array) -> Prompt:
  """Trigger ids [P] -> the batch-1 prompt: embeds [1, P, D] (float32 rows of table [V, D]),
  tokens [1, P]."""
  ids = jnp.asarray(ids)
  return Prompt(embeds=jnp.take(table, ids, axis=0).astype(jnp.float32)[None], tokens=ids[None])


def allowed_tokens(config, vocab_limit: int = 0) -> np.ndarray:
  """Candidate mask [V]: every id of the embedding table but the config's bos/eos ids and the
  ids >= vocab_limit (when > 0)."""
  allowed = np.ones((config.vocab_size,), bool)
  if vocab_limit > 0:
    allowed[vocab_limit:] = False
  eos = config.eos_token_id
  for i in (config.bos_token_id, *(eos if isinstance(eos, tuple) else (eos,))):
    if i is not None and 0 <= i < config.vocab_size:
      allowed[i] = False
  return allowed


def initial_trigger(config, hp: Hparams) -> np.ndarray:
  """P copies of hp.init_token ([P] int32, on the host); -1 means the config's eos id (the first of
  several), 0 if it has none."""
  token = hp.init_token
  if token == -1:
    eos = config.eos_token_id
    token = (eos[0] if isinstance(eos, tuple) else eos) or 0
  if not 0 <= token < config.vocab_size:
    raise ValueError(f'autoprompt.init_token={hp.init_token}: not an id of the vocabulary '
                     f'(0..{config.vocab_size - 1}, or -1 for eos)')
  return np.full((hp.prompt_len,), token, np.int32)


@functools.partial(jax.jit, static_argnames=('module', 'num_cand'))
def search_step(module, params: dict, ids: jax.Array, pos, allowed: jax.Array, batch: dict,
                num_cand: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One iteration's passes for the trigger ids [P] at position pos, allowed [V] the candidates.

  Returns (the trigger's loss, the top num_cand candidate ids [K] among the allowed ones by
  table @ -g, g [D] the loss's gradient w.r.t. position pos's embedding, and the candidates'
  losses [K], each the trigger with position pos replaced): 1 + K forward passes, 1 backward.
  """
  table = params[module.config.embed_param]  # [V, D]

  def loss_of_embeds(embeds):  # [P, D]
    return objective.mean_nll(module, params, Prompt(embeds=embeds[None], tokens=ids[None]),
                              batch)

  loss, grad = jax.value_and_grad(loss_of_embeds)(trigger_prompt(table, ids).embeds[0])
  scores = table.astype(jnp.float32) @ -grad[pos]  # [V]: first-order loss decrease
  cands = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), num_cand)[1]  # [K]

  def cand_loss(token):
    return objective.mean_nll(module, params, trigger_prompt(table, ids.at[pos].set(token)), batch)

  return loss, cands, jax.lax.map(cand_loss, cands)


@functools.partial(jax.jit, static_argnames=('module', 'num_cand'))
def search(module, params: dict, ids: jax.Array, positions: jax.Array, allowed: jax.Array,
           batch: dict, num_cand: int) -> tuple[jax.Array, jax.Array]:
  """Every iteration in one program (no host round trip between them): the trigger ids [P]
  flipped at positions [I] in turn, each keeping its best candidate if it lowers the loss.
  Returns (the final trigger [P], the kept trigger's loss after each iteration [I])."""

  def iteration(carry, pos):
    ids, best, first = carry
    loss, cands, cand_losses = search_step(module, params, ids, pos, allowed, batch, num_cand)
    best = jnp.where(first, loss, best)  # the first iteration's forward scores the start
    i = jnp.argmin(cand_losses)  # the first minimum (a NaN, as numpy's; NaN < best is False)
    better = cand_losses[i] < best
    ids = jnp.where(better, ids.at[pos].set(cands[i]), ids)
    best = jnp.where(better, cand_losses[i], best)
    return (ids, best, False), best

  start = (jnp.asarray(ids, jnp.int32), jnp.float32(jnp.inf), True)
  (ids, _, _), losses = jax.lax.scan(iteration, start, positions)
  return ids, losses


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng) -> common.TuneResult:
  cfg = module.config
  if hp.prompt_len < 1 or hp.iters < 0 or hp.num_cand < 1:
    raise ValueError(f'autoprompt: prompt_len={hp.prompt_len} and num_cand={hp.num_cand} must '
                     f'be >= 1, iters={hp.iters} >= 0')
  allowed = allowed_tokens(cfg, hp.vocab_limit)
  if allowed.sum() < hp.num_cand:
    raise ValueError(f'autoprompt.num_cand={hp.num_cand}: only {allowed.sum()} allowed tokens')
  ids = initial_trigger(cfg, hp)
  spec = common.short_buckets(spec)
  batch = common.train_batch(task, idx, spec.with_prompt_len(hp.prompt_len))
  positions = common.np_rng(common.as_key(rng)).integers(hp.prompt_len, size=hp.iters)
  losses = []
  if hp.iters:
    ids, losses = search(module, params, ids, jnp.asarray(positions, jnp.int32),
                         jnp.asarray(allowed), batch, hp.num_cand)
    ids, losses = np.asarray(ids), np.asarray(losses).tolist()
  return common.TuneResult(prompt=trigger_prompt(params[cfg.embed_param], ids),
                           forward_passes=hp.iters * (1 + hp.num_cand),
                           backward_passes=hp.iters, losses=losses)
