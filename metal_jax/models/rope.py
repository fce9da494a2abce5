"""Rotary position embeddings in HF's rotate-half layout (pure functions).

HF checkpoints store q/k projections for the rotate-half layout, so conversion
only transposes weights. Frequencies follow transformers' `modeling_rope_utils`
for rope types `default`, `linear` and `llama3`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """HF's `rope_scaling` dict as a hashable value (`rope_type` linear or llama3)."""
  rope_type: str
  factor: float = 1.0
  low_freq_factor: float | None = None  # llama3 only
  high_freq_factor: float | None = None  # llama3 only
  original_max_position_embeddings: int | None = None  # llama3 only

  SUPPORTED = ('linear', 'llama3')

  @classmethod
  def from_hf(cls, d: dict | None, max_position_embeddings: int) -> 'RopeScaling | None':
    if not d:
      return None
    rope_type = d.get('rope_type', d.get('type', 'default'))
    if rope_type == 'default':
      return None
    if rope_type not in cls.SUPPORTED:
      raise ValueError(
          f'rope_scaling: unsupported rope_type {rope_type!r} (supported: default, '
          f'{", ".join(cls.SUPPORTED)})')
    if rope_type == 'linear':
      return cls(rope_type='linear', factor=float(d['factor']))
    return cls(
        rope_type='llama3', factor=float(d['factor']),
        low_freq_factor=float(d['low_freq_factor']),
        high_freq_factor=float(d['high_freq_factor']),
        original_max_position_embeddings=int(
            d.get('original_max_position_embeddings', max_position_embeddings)))

  def to_hf(self) -> dict:
    d = {'rope_type': self.rope_type, 'factor': self.factor}
    if self.rope_type == 'llama3':
      d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
               original_max_position_embeddings=self.original_max_position_embeddings)
    return d


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [H/2] in float32, as transformers computes them."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.rope_type == 'linear':
    return inv_freq / scaling.factor
  # llama3: leave high frequencies, divide low ones by `factor`, interpolate between.
  old_ctx = scaling.original_max_position_embeddings
  low_wavelen = old_ctx / scaling.low_freq_factor
  high_wavelen = old_ctx / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, N, H] for integer positions [B, T]; computed in float32."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  xf = x.astype(jnp.float32)
  out = xf * jnp.cos(emb) + rotate_half(xf) * jnp.sin(emb)
  return out.astype(x.dtype)
