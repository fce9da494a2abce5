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

from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.pgm import PaddingEncoder



@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams(common.TuningHparams):
  lr: float = 1.6e-4  # the paper's
  lstm_layers: int = 2


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng) -> common.TuneResult:
  encoder = PaddingEncoder(hp.prompt_len, module.config.d_model, hp.lstm_layers)
  return common.tune_encoder(common.EncoderPrompt(encoder, 'embeds'), module, params, task, idx,
                             spec, hp, rng)
