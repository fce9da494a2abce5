"""Equation 1: the frozen LM's negative log-likelihood of y given f_P(X^P), X^L and x.

Only y's tokens are scored (`target_mask`); every other token, the padding and
the prompt are masked out. The loss of a batch is the mean over all scored
tokens, computed as (sum, count) so that gradient accumulation and sharding
reproduce the full-batch value exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metal_jax import pgm
from metal_jax.data.episodes import pgm_chunk_keys


LM_KEYS = ('lm_ids', 'lm_mask', 'target_pos', 'target_ids', 'target_mask')  # an LM half's


def token_nll(logits, target_ids, target_mask):
  """Per-token NLL [B, Y] (zero where masked) from logits [B, Y, V]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return nll * target_mask


def score(module, params: dict, prompt: pgm.Prompt | None, lm_half: dict, **kw
          ) -> tuple[jax.Array, jax.Array]:
  """Per row: (sum of y-token NLLs [B], number of y tokens [B]) of an LM half under a prompt.

  The one place the frozen LM scores (X^L, x, y): meta-training, option scoring and every
  baseline's loss call it. `lm_half` has lm_ids, lm_mask [B, T] and target_pos, target_ids,
  target_mask [B, Y]; `prompt` is None, B prompts (row b scored under prompt row b) or G
  prompts for G dividing B: keys/values shared by B/G consecutive rows each without a copy
  (layers.attend), embeddings broadcast. `kw` goes to the LM (prefix_mask and positions for a
  padded prefix: serving.scoring's contexts).
  """
  b = lm_half['lm_ids'].shape[0]
  if prompt is not None and (prompt.kv is None or b % prompt.batch_size):
    prompt = prompt.broadcast_to(b)
  out = pgm.apply_with_prompt(module, params, prompt, lm_half['lm_ids'], lm_half['lm_mask'],
                              logit_positions=lm_half['target_pos'], **kw)
  nll = token_nll(out.logits, lm_half['target_ids'], lm_half['target_mask'])
  return nll.sum(-1), lm_half['target_mask'].sum(-1).astype(jnp.float32)


def nll_sum(cfg: pgm.PGMConfig, module, params: dict, trainable: dict, batch: dict, *,
            rng: jax.Array | None = None, train: bool = True) -> tuple[jax.Array, jax.Array]:
  """(sum of y-token NLLs, number of y tokens) for a batch of episodes: PGM pass, then score.

  Iterative generation (batch keys pgm_ids_1, ...: episodes.pgm_chunk_keys): pass i reads its
  examples and pass i-1's prompt, and every pass's prompt is scored, so the loss is the mean
  over the passes (each prompt, not only the last, must serve the LM).

  LM keys [B, Q, ...] (Q queries an episode: episodes.collate) are scored as B x Q rows, episode
  b's Q queries consecutive under its prompt (score's shared keys/values, no copy)."""
  lm_half = {k: batch[k] for k in LM_KEYS}
  if lm_half['lm_ids'].ndim == 3:
    lm_half = {k: v.reshape(-1, v.shape[-1]) for k, v in lm_half.items()}
  total = count = jnp.float32(0)
  prompt, i = None, 0
  while pgm_chunk_keys(i)[0] in batch:
    ids, mask = pgm_chunk_keys(i)
    r = None if rng is None else (rng if i == 0 else jax.random.fold_in(rng, i))
    prompt = pgm.generate(cfg, module, params, trainable, batch[ids], batch[mask], rng=r,
                          train=train, prev=prompt)
    t, c = score(module, params, prompt, lm_half)
    total, count, i = total + t.sum(), count + c.sum(), i + 1
  return total, count


def loss(cfg: pgm.PGMConfig, module, params: dict, trainable: dict, batch: dict, *,
         rng: jax.Array | None = None, train: bool = True) -> jax.Array:
  """Mean NLL of y's tokens over the batch."""
  total, count = nll_sum(cfg, module, params, trainable, batch, rng=rng, train=train)
  return total / jnp.maximum(count, 1.0)


def mean_nll(module, params: dict, prompt: pgm.Prompt | None, lm_half: dict) -> jax.Array:
  """Mean NLL over all the LM half's y tokens (the baselines' tuning loss)."""
  total, count = score(module, params, prompt, lm_half)
  return total.sum() / jnp.maximum(count.sum(), 1.0)
