"""P-tuning (Liu et al. 2021): input-embedding prompts reparameterised by a prompt encoder.

The P prompt embeddings come from pgm.PaddingEncoder (an embedding table [P, D]
-> bidirectional LSTM (lstm_layers layers) -> two-layer ReLU MLP), the same
encoder the PGM uses for its padding; the encoder's weights are trained, the
prompt is its output as Prompt(embeds=[1, P, D]) placed before the input (a
prefix template: there is no hand-written template here). The paper's budget:
AdamW lr 1.6e-4, linear decay, 10 epochs of batch 16, prompt length 20.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.pgm import PaddingEncoder, Prompt

DEFAULTS = dict(lr=1.6e-4, epochs=10, batch_size=16, prompt_len=20, lstm_layers=2,
                weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class EncoderPrompt:
  """The encoder's params -> Prompt(embeds=[1, P, D])."""
  prompt_len: int
  d_model: int
  lstm_layers: int

  def encoder(self) -> PaddingEncoder:
    return PaddingEncoder(self.prompt_len, self.d_model, self.lstm_layers)

  def __call__(self, p) -> Prompt:
    return Prompt(embeds=self.encoder().apply({'params': p})[None])


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec, *, rng,
        init_prompt: Prompt | None = None, **hparams) -> common.TuneResult:
  hp = common.merge_hparams('p_tuning', DEFAULTS, hparams)
  if init_prompt is not None:
    raise ValueError('p_tuning: init_prompt is not supported (the prompt is an encoder output)')
  r_init, r_shuffle = jax.random.split(common.as_key(rng))
  to_prompt = EncoderPrompt(hp['prompt_len'], module.config.d_model, hp['lstm_layers'])
  init = common.init_module(to_prompt.encoder(), r_init)
  batch = common.train_batch(task, idx, common.spec_for(spec, hp['prompt_len']))
  trained, losses = common.tune(init, to_prompt, module, params, batch, lr=hp['lr'],
                                epochs=hp['epochs'], batch_size=hp['batch_size'], rng=r_shuffle,
                                weight_decay=hp['weight_decay'])
  return common.gradient_result(trained, to_prompt, losses)
