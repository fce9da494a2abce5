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


def token_nll(logits, target_ids, target_mask):
  """Per-token NLL [B, Y] (zero where masked) from logits [B, Y, V]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return nll * target_mask


def nll_sum(cfg: pgm.PGMConfig, module, params: dict, trainable: dict, batch: dict, *,
            rng: jax.Array | None = None, train: bool = True) -> tuple[jax.Array, jax.Array]:
  """(sum of y-token NLLs, number of y tokens) for a batch of episodes."""
  prompt = pgm.generate(cfg, module, params, trainable, batch['pgm_ids'], batch['pgm_mask'],
                        rng=rng, train=train)
  out = pgm.apply_with_prompt(module, params, prompt, batch['lm_ids'], batch['lm_mask'],
                              logit_positions=batch['target_pos'])
  nll = token_nll(out.logits, batch['target_ids'], batch['target_mask'])
  return nll.sum(), batch['target_mask'].sum().astype(jnp.float32)


def loss(cfg: pgm.PGMConfig, module, params: dict, trainable: dict, batch: dict, *,
         rng: jax.Array | None = None, train: bool = True) -> jax.Array:
  """Mean NLL of y's tokens over the batch."""
  total, count = nll_sum(cfg, module, params, trainable, batch, rng=rng, train=train)
  return total / jnp.maximum(count, 1.0)
