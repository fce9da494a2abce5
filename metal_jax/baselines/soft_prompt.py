"""SoftPrompt (Lester et al. 2021): P trainable input embeddings before the input, the LM frozen.

The prompt is [P, D] input embeddings (Prompt(embeds=[1, P, D])), initialised
from P randomly sampled rows of the LM's word-embedding table (Lester et al.'s
"sampled vocabulary" initialisation, here uniform over the whole vocabulary),
then tuned with
common.tune. The paper's budget: AdamW lr 4e-5, linear decay, 10 epochs of
batch 16 over the 16 examples, prompt length 20.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.pgm import Prompt



@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams(common.TuningHparams):
  lr: float = 4e-5  # the paper's


@dataclasses.dataclass(frozen=True)
class EmbedsPrompt:
  """{'embeds': [P, D]} -> Prompt(embeds=[1, P, D])."""

  def __call__(self, p) -> Prompt:
    return Prompt(embeds=p['embeds'][None])


def init_from_vocab(rng, module, params: dict, prompt_len: int) -> jax.Array:
  """P rows of the word-embedding table, sampled without replacement (with, if V < P)."""
  table = params[module.config.embed_param]  # [V, D]
  v = table.shape[0]
  rows = common.np_rng(rng).choice(v, prompt_len, replace=v < prompt_len)
  return jnp.asarray(np.asarray(table)[rows], jnp.float32)


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng) -> common.TuneResult:
  r_init, r_shuffle = jax.random.split(common.as_key(rng))
  embeds = init_from_vocab(r_init, module, params, hp.prompt_len)
  batch = common.train_batch(task, idx, spec.with_prompt_len(embeds.shape[0]))
  to_prompt = EmbedsPrompt()
  trained, losses = common.tune({'embeds': embeds}, to_prompt, module, params, batch,
                                lr=hp.lr, epochs=hp.epochs, batch_size=hp.batch_size,
                                rng=r_shuffle, weight_decay=hp.weight_decay)
  return common.gradient_result(trained, to_prompt, losses)
