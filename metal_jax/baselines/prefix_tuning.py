"""Prefix-tuning (Li & Liang 2021): per-layer prefix keys/values through an MLP reparameterisation.

An embedding [P, D] goes through an MLP (Dense D -> hidden (512) -> tanh ->
Dense -> L * 2 * K * H), reshaped to each layer's prefix keys and values; the
embedding and the MLP are trained, and the prompt is the MLP's output,
Prompt(kv=KV(k, v)) with k, v of [L, 1, P, K, H] (K key/value heads of width H),
prepended to the frozen LM's keys/values in every layer. For Llama the keys
are used as they stand (an HF cache holds rotated keys; a free parameter needs
no rotation). The paper's budget: AdamW lr 2e-4, linear decay, 10 epochs of
batch 16, prompt length 20.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn

from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask



@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams(common.TuningHparams):
  lr: float = 2e-4  # the paper's
  hidden: int = 512  # the reparameterising MLP's width


class PrefixEncoder(nn.Module):
  """embedding [P, D] -> Dense(hidden) -> tanh -> Dense(L * 2 * K * H) -> [L, 2, P, K, H]."""
  prompt_len: int
  d_model: int
  hidden: int
  n_layers: int
  n_kv_heads: int
  head_dim: int

  @nn.compact
  def __call__(self):
    p, l, k, h = self.prompt_len, self.n_layers, self.n_kv_heads, self.head_dim
    x = self.param('embedding', nn.initializers.normal(0.02), (p, self.d_model))
    x = nn.Dense(self.hidden, name='mlp_0')(x)
    x = nn.Dense(l * 2 * k * h, name='mlp_1')(nn.tanh(x))  # [P, L*2*K*H]
    return x.reshape(p, l, 2, k, h).transpose(1, 2, 0, 3, 4)  # [L, 2, P, K, H]


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng) -> common.TuneResult:
  cfg = module.config
  encoder = PrefixEncoder(hp.prompt_len, cfg.d_model, hp.hidden, cfg.n_layers, cfg.n_kv_heads,
                          cfg.head_dim)
  return common.tune_encoder(common.EncoderPrompt(encoder, 'kv'), module, params, task, idx,
                             spec, hp, rng)
