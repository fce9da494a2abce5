"""MetaL(+Tune): the PGM's prompt initialises gradient prompt tuning on the same few-shot examples.

`init_prompt` (required, batch 1) is the prompt the PGM generated for the task
(evaluation.prompt_for). Its tensors are tuned directly, no reparameterisation:
the prefix keys/values KV(k, v) [L, 1, P, K, H] for the prefix design (the
paper's default and the paper's MetaL+Tune), or the input embeddings [1, P, D]
for the embedding designs (hidden_state, weighted_sum, discrete: the tokens are
dropped, their embeddings are tuned). The paper: lr 0.02, 9 epochs of batch 16
(to match the baselines' budget), AdamW with linear decay. With 0 epochs the
prompt is returned unchanged (values in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp

from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import KV
from metal_jax.pgm import Prompt



@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams:
  """The paper: lr 0.02, 9 epochs of batch 16 (the baselines' budget less the PGM's pass)."""
  lr: float = 0.02
  epochs: int = 9
  batch_size: int = 16
  weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class DirectPrompt:
  """{'k', 'v'} -> Prompt(kv=KV(k, v)); {'embeds'} -> Prompt(embeds=...). Batch 1 throughout."""

  def __call__(self, p) -> Prompt:
    if 'embeds' in p:
      return Prompt(embeds=p['embeds'])
    return Prompt(kv=KV(p['k'], p['v']))


def trainable_of(prompt: Prompt) -> dict:
  if prompt.kv is not None:
    if prompt.kv.k.shape[1] != 1:
      raise ValueError(f'metal_tune: init_prompt must have batch 1, got {prompt.kv.k.shape[1]}')
    return {'k': jnp.asarray(prompt.kv.k, jnp.float32), 'v': jnp.asarray(prompt.kv.v, jnp.float32)}
  if prompt.embeds is not None:
    if prompt.embeds.shape[0] != 1:
      raise ValueError(f'metal_tune: init_prompt must have batch 1, got {prompt.embeds.shape[0]}')
    return {'embeds': jnp.asarray(prompt.embeds, jnp.float32)}
  raise ValueError('metal_tune: init_prompt has neither kv nor embeds')


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng, init_prompt: Prompt) -> common.TuneResult:
  init = trainable_of(init_prompt)
  to_prompt = DirectPrompt()
  batch = common.train_batch(task, idx, spec.with_prompt_len(init_prompt.length))
  trained, losses = common.tune(init, to_prompt, module, params, batch, lr=hp.lr,
                                epochs=hp.epochs, batch_size=hp.batch_size,
                                rng=common.as_key(rng), weight_decay=hp.weight_decay)
  return common.gradient_result(trained, to_prompt, losses)
