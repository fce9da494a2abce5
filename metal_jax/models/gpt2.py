"""GPT-2: learned positions, pre-LN blocks, fused c_attn, gelu_new MLP, tied head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from metal_jax.models import layers
from metal_jax.models.base import CausalLM, ComputeConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ComputeConfig):
  """Mirrors transformers.GPT2Config (the fields the model uses)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # None: 4 * n_embd
  activation_function: str = 'gelu_new'
  layer_norm_epsilon: float = 1e-5

  bos_token_id: int | None = None  # carried through to exported configs
  eos_token_id: int | tuple[int, ...] | None = None

  embed_param = 'wte'  # the word-embedding table's param name
  model_type = 'gpt2'
  HF_FIELDS = ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head', 'n_inner',
               'activation_function', 'layer_norm_epsilon')

  def __post_init__(self):
    super().__post_init__()
    if self.activation_function not in layers.ACTIVATIONS:
      raise ValueError(f'activation_function={self.activation_function!r} is not supported '
                       f'(supported: {sorted(layers.ACTIVATIONS)})')
    if self.n_embd % self.n_head:
      raise ValueError(f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}')

  # Uniform names used by layers, LoRA and sharding.
  n_layers = property(lambda self: self.n_layer)
  d_model = property(lambda self: self.n_embd)
  n_heads = property(lambda self: self.n_head)
  n_kv_heads = property(lambda self: self.n_head)
  head_dim = property(lambda self: self.n_embd // self.n_head)
  mlp_dim = property(lambda self: self.n_inner or 4 * self.n_embd)
  max_len = property(lambda self: self.n_positions)
  tie_word_embeddings = True

  @classmethod
  def from_hf(cls, d: dict, **compute) -> 'GPT2Config':
    unsupported = {k: d[k] for k in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn')
                   if d.get(k)}
    if d.get('scale_attn_weights', True) is False:
      unsupported['scale_attn_weights'] = False
    if unsupported:
      raise ValueError(f'GPT-2 config options not supported: {unsupported}')
    return cls(**{k: d[k] for k in cls.HF_FIELDS if k in d}, **cls.token_ids_from_hf(d), **compute)

  def to_hf(self) -> dict:
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'],
            **{k: getattr(self, k) for k in self.HF_FIELDS}, 'tie_word_embeddings': True,
            **self.token_ids_to_hf()}


class GPT2Attention(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, mask, prefix):
    cfg = self.config
    n, h = cfg.n_heads, cfg.head_dim
    qkv = layers.dense(self, 'c_attn', x, ('embed',), (3, n, h), ('qkv', 'heads', 'head_dim'),
                       use_bias=True)  # [B, T, 3, N, H]
    q, k, v = (layers.add_lora(self, name, x, qkv[:, :, i]) for i, name in enumerate('qkv'))
    o = layers.attend(q, k, v, mask, prefix)  # [B, T, N, H]
    out = layers.dense(self, 'c_proj', o, ('heads', 'head_dim'), (cfg.d_model,), ('embed',),
                       use_bias=True, lora_target='o')
    return out, layers.KV(k, v)


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    hid = layers.dense(self, 'c_fc', x, ('embed',), (cfg.mlp_dim,), ('mlp',), use_bias=True,
                       lora_target='up')
    hid = layers.ACTIVATIONS[cfg.activation_function](hid)
    return layers.dense(self, 'c_proj', hid, ('mlp',), (cfg.d_model,), ('embed',), use_bias=True,
                        lora_target='down')


class GPT2Block(nn.Module):
  config: GPT2Config
  return_kv: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, prefix):
    cfg = self.config
    a, kv = GPT2Attention(cfg, name='attn')(
        layers.LayerNorm(cfg, cfg.layer_norm_epsilon, name='ln_1')(x), mask, prefix)
    x = x + a
    x = x + GPT2MLP(cfg, name='mlp')(layers.LayerNorm(cfg, cfg.layer_norm_epsilon, name='ln_2')(x))
    return x, (kv if self.return_kv else None)


class GPT2LM(CausalLM):
  config: GPT2Config
  block_cls = GPT2Block

  def embedding(self):
    return layers.param(self, 'wte', (self.config.vocab_size, self.config.d_model),
                        ('vocab', 'embed'))

  def embed_positions(self, x, positions):
    wpe = layers.param(self, 'wpe', (self.config.n_positions, self.config.d_model),
                       (None, 'embed'), nn.initializers.normal(0.01))
    return x + jnp.take(wpe, positions, axis=0)

  def final_norm(self, x):
    return layers.LayerNorm(self.config, self.config.layer_norm_epsilon, name='ln_f')(x)

  def lm_head(self, x, table):
    return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)
