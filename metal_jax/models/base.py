"""What GPT-2 and Llama share: compute settings in the config, the output type, the top-level model."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from metal_jax.models import layers

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeConfig:
  """Fields of ours (not HF's) that every model config carries."""
  dtype: str = 'float32'  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = 'float32'  # storage dtype of the frozen params
  scan_layers: bool = False  # nn.scan over layers (params stacked on a leading L axis)
  # Rematerialisation of each block in the backward pass: a policy name of REMAT_POLICIES, or
  # True / False for 'full' / 'none'.
  remat: bool | str = False

  def __post_init__(self):
    for f in ('dtype', 'param_dtype'):
      if getattr(self, f) not in DTYPES:
        raise ValueError(f'config.{f}={getattr(self, f)!r}: expected one of {sorted(DTYPES)}')
    layers.remat_policy(self.remat)  # refuses an unknown policy now, naming it

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @staticmethod
  def token_ids_from_hf(d: dict) -> dict:
    eos = d.get('eos_token_id')
    return {'bos_token_id': d.get('bos_token_id'),
            'eos_token_id': tuple(eos) if isinstance(eos, list) else eos}

  def token_ids_to_hf(self) -> dict:
    eos = self.eos_token_id
    return {'bos_token_id': self.bos_token_id,
            'eos_token_id': list(eos) if isinstance(eos, tuple) else eos}

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


@flax.struct.dataclass
class LMOutput:
  logits: jax.Array | None  # [B, T, V] float32
  kv: layers.KV | None = None  # [L, B, T, K, H] per field, when return_kv
  hidden: jax.Array | None = None  # [B, T, D] final hidden states entering the LM head


class CausalLM(nn.Module):
  """Embeddings -> blocks -> final norm -> LM head. Subclasses define the pieces.

  __call__(input_ids [B, T], attention_mask [B, T] (1 = real token), prefix=KV
  of [L, B, P, K, H]) runs the LM with the prefix's P slots before the input, the
  input at positions P..P+T-1, as transformers does given `past_key_values` of
  length P. `input_embeds` [B, T, D] replaces the token embeddings (the PGM's
  trainable padding, or a prompt of embeddings).
  """
  config: Any

  # Subclasses define: block_cls (the layer module), embedding() -> [V, D] table,
  # embed_positions, final_norm and lm_head.

  def embed_positions(self, x, positions):
    return x

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, prefix: layers.KV | None = None, *,
               prefix_mask=None, input_embeds=None, embeds_mask=None, positions=None,
               logit_positions=None,
               return_kv: bool = False, return_hidden: bool = False,
               return_logits: bool = True) -> LMOutput:
    """Runs the LM.

    `input_embeds` [B, T, D] replace the token embeddings where `embeds_mask`
    [B, T] is true (everywhere when input_ids is None). `positions` [B, T]
    overrides the default P..P+T-1 (left padding). `prefix_mask` [B, P] hides prefix slots
    where false (a padded prefix: pass `positions` continuing from each row's visible
    length). `logit_positions` [B, Y]
    computes logits only at those positions (logits [B, Y, V]): the LM head is
    the largest matmul, and a loss needs only the answer's positions.
    """
    cfg = self.config
    table = self.embedding()  # [V, D]
    if input_ids is not None:
      x = jnp.take(table, input_ids, axis=0)
      if input_embeds is not None:
        sel = jnp.ones(input_ids.shape, bool) if embeds_mask is None else embeds_mask
        x = jnp.where(sel[..., None], jnp.asarray(input_embeds, cfg.jnp_dtype), x)
    elif input_embeds is not None:
      x = jnp.asarray(input_embeds, cfg.jnp_dtype)
    else:
      raise ValueError('CausalLM needs input_ids or input_embeds')
    b, t = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    p = 0 if prefix is None else prefix.k.shape[2]
    if positions is None:
      positions = jnp.broadcast_to(p + jnp.arange(t), (b, t))
    x = self.embed_positions(x, positions)
    mask = layers.attention_mask(attention_mask, p, prefix_mask)
    x, kv = layers.run_layers(self.block_cls, cfg, x, positions, mask, prefix, return_kv)
    x = self.final_norm(x)
    logits = None
    if return_logits:
      h = x if logit_positions is None else jnp.take_along_axis(
          x, logit_positions[..., None].astype(jnp.int32), axis=1)  # [B, Y, D]
      logits = self.lm_head(h, table)
    return LMOutput(logits=logits, kv=kv, hidden=x if return_hidden else None)
