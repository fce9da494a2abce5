"""Llama (2 and 3): RMSNorm, RoPE (default/linear/llama3), GQA/MQA, SwiGLU, tied or untied head."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from metal_jax.models import layers, rope
from metal_jax.models.base import CausalLM, ComputeConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ComputeConfig):
  """Mirrors transformers.LlamaConfig (the fields the model uses)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA); 1: MQA
  head_dim_: int | None = None  # HF `head_dim`; None: hidden_size // num_attention_heads
  hidden_act: str = 'silu'
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: rope.RopeScaling | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False

  bos_token_id: int | None = None  # carried through to exported configs
  eos_token_id: int | tuple[int, ...] | None = None

  embed_param = 'embed_tokens'  # the word-embedding table's param name
  model_type = 'llama'
  HF_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
               'num_attention_heads', 'num_key_value_heads', 'hidden_act',
               'max_position_embeddings', 'rms_norm_eps', 'tie_word_embeddings',
               'attention_bias', 'mlp_bias')

  def __post_init__(self):
    super().__post_init__()
    if self.hidden_act not in layers.ACTIVATIONS:
      raise ValueError(f'hidden_act={self.hidden_act!r} is not supported')
    if self.num_attention_heads % self.n_kv_heads:
      raise ValueError(f'num_attention_heads={self.num_attention_heads} is not a multiple of '
                       f'num_key_value_heads={self.n_kv_heads}')

  n_layers = property(lambda self: self.num_hidden_layers)
  d_model = property(lambda self: self.hidden_size)
  n_heads = property(lambda self: self.num_attention_heads)
  n_kv_heads = property(lambda self: self.num_key_value_heads or self.num_attention_heads)
  head_dim = property(lambda self: self.head_dim_ or self.hidden_size // self.num_attention_heads)
  mlp_dim = property(lambda self: self.intermediate_size)
  max_len = property(lambda self: self.max_position_embeddings)

  @functools.cached_property
  def inv_freq(self):
    return rope.inv_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

  @classmethod
  def from_hf(cls, d: dict, **compute) -> 'LlamaConfig':
    """Reads transformers v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) configs."""
    rope_params = dict(d.get('rope_parameters') or {})
    scaling = d.get('rope_scaling') or rope_params
    theta = rope_params.get('rope_theta', d.get('rope_theta', 10000.0))
    max_pos = d.get('max_position_embeddings', 2048)
    return cls(**{k: d[k] for k in cls.HF_FIELDS if k in d}, head_dim_=d.get('head_dim'),
               rope_theta=float(theta), rope_scaling=rope.RopeScaling.from_hf(scaling, max_pos),
               **cls.token_ids_from_hf(d), **compute)

  def to_hf(self) -> dict:
    d = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'],
         **{k: getattr(self, k) for k in self.HF_FIELDS}, 'head_dim': self.head_dim,
         'num_key_value_heads': self.n_kv_heads, 'rope_theta': self.rope_theta,
         **self.token_ids_to_hf()}
    d['rope_scaling'] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
    return d


class LlamaAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, prefix):
    cfg = self.config
    n, kh, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    proj = functools.partial(layers.dense, self, use_bias=cfg.attention_bias)
    q = proj('q_proj', x, ('embed',), (n, h), ('heads', 'head_dim'), lora_target='q')
    k_raw = proj('k_proj', x, ('embed',), (kh, h), ('kv_heads', 'head_dim'), lora_target='k')
    v = proj('v_proj', x, ('embed',), (kh, h), ('kv_heads', 'head_dim'), lora_target='v')
    q = rope.apply_rope(q, positions, cfg.inv_freq)
    k = rope.apply_rope(k_raw, positions, cfg.inv_freq)
    o = layers.attend(q, k, v, mask, prefix)  # [B, T, N, H]
    out = proj('o_proj', o, ('heads', 'head_dim'), (cfg.d_model,), ('embed',), lora_target='o')
    return out, layers.KV(k, v, k_raw)


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    proj = functools.partial(layers.dense, self, use_bias=cfg.mlp_bias)
    gate = proj('gate_proj', x, ('embed',), (cfg.mlp_dim,), ('mlp',), lora_target='gate')
    up = proj('up_proj', x, ('embed',), (cfg.mlp_dim,), ('mlp',), lora_target='up')
    hid = layers.ACTIVATIONS[cfg.hidden_act](gate) * up
    return proj('down_proj', hid, ('mlp',), (cfg.d_model,), ('embed',), lora_target='down')


class LlamaBlock(nn.Module):
  config: LlamaConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, prefix):
    cfg = self.config
    a, kv = LlamaAttention(cfg, name='attn')(
        layers.RMSNorm(cfg, cfg.rms_norm_eps, name='input_layernorm')(x), positions, mask, prefix)
    x = x + a
    x = x + LlamaMLP(cfg, name='mlp')(
        layers.RMSNorm(cfg, cfg.rms_norm_eps, name='post_attention_layernorm')(x))
    return x, (kv if self.return_kv else None)


class LlamaLM(CausalLM):
  config: LlamaConfig
  block_cls = LlamaBlock

  def embedding(self):
    return layers.param(self, 'embed_tokens', (self.config.vocab_size, self.config.d_model),
                        ('vocab', 'embed'))

  def final_norm(self, x):
    return layers.RMSNorm(self.config, self.config.rms_norm_eps, name='norm')(x)

  def lm_head(self, x, table):
    if self.config.tie_word_embeddings:
      return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)
    w = layers.param(self, 'lm_head', (self.config.d_model, self.config.vocab_size),
                     ('embed', 'vocab'))
    return jnp.einsum('btd,dv->btv', x, w, preferred_element_type=jnp.float32)
