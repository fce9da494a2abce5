"""LoRA as its own trainable pytree, apart from the frozen params.

The pytree mirrors the module tree: for each layer, `attn/{q,k,v,o}` and
`mlp/{gate,up,down}` hold {'a': [in..., R], 'b': [R, out...]}. A is random and B
is zero, so an adapted model equals the base at initialisation. The same module
applied with `variables(params, lora_params, cfg)` is the PGM; applied with
{'params': params} alone it is the frozen LM. The frozen params are one pytree.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ATTN_TARGETS = ('q', 'k', 'v', 'o')
MLP_TARGETS = ('gate', 'up', 'down')


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = ('q', 'v')  # from q k v o (attention) and gate up down (MLP)

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'lora.rank={self.rank}: must be >= 1')
    bad = [t for t in self.targets if t not in ATTN_TARGETS + MLP_TARGETS]
    if bad or not self.targets:
      raise ValueError(f'lora.targets={self.targets}: unknown {bad}; choose from '
                       f'{ATTN_TARGETS + MLP_TARGETS}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_shapes(model_cfg, target: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """(submodule, in dims, out dims) of a target's weight in one block."""
  d, n, k, h, f = (model_cfg.d_model, model_cfg.n_heads, model_cfg.n_kv_heads,
                   model_cfg.head_dim, model_cfg.mlp_dim)
  table = {'q': ('attn', (d,), (n, h)), 'k': ('attn', (d,), (k, h)), 'v': ('attn', (d,), (k, h)),
           'o': ('attn', (n, h), (d,)), 'gate': ('mlp', (d,), (f,)), 'up': ('mlp', (d,), (f,)),
           'down': ('mlp', (f,), (d,))}
  if target == 'gate' and model_cfg.model_type == 'gpt2':
    raise ValueError("lora target 'gate': GPT-2's MLP has no gate projection")
  return table[target]


def init(rng: jax.Array, model_cfg, cfg: LoraConfig, dtype=jnp.float32) -> dict:
  """A fresh LoRA pytree for `model_cfg`'s layer layout (loop or scan): A ~ U(±1/sqrt(fan_in)), B = 0."""
  n_layers = model_cfg.n_layers
  lead = (n_layers,) if model_cfg.scan_layers else ()

  def one_layer(key, stacked_dims):
    layer = {}
    for i, t in enumerate(cfg.targets):
      sub, din, dout = target_shapes(model_cfg, t)
      bound = 1.0 / math.sqrt(math.prod(din))
      a = jax.random.uniform(jax.random.fold_in(key, i), stacked_dims + din + (cfg.rank,), dtype,
                             -bound, bound)
      b = jnp.zeros(stacked_dims + (cfg.rank,) + dout, dtype)
      layer.setdefault(sub, {})[t] = {'a': a, 'b': b}
    return layer

  if lead:
    return {'layers': one_layer(rng, lead)}
  return {f'layers_{i}': one_layer(jax.random.fold_in(rng, i), ()) for i in range(n_layers)}


def scaled(lora_params: dict, cfg: LoraConfig) -> dict:
  """The pytree the modules consume: B multiplied by alpha / rank (gradients flow as in LoRA)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * cfg.scale if path[-1].key == 'b' else x, lora_params)


def variables(params: dict, lora_params: dict | None, cfg: LoraConfig | None) -> dict:
  """Variables for module.apply: the frozen LM, plus the LoRA pytree when given (the PGM)."""
  if lora_params is None:
    return {'params': params}
  return {'params': params, 'lora': scaled(lora_params, cfg)}


def count(lora_params: dict) -> int:
  return sum(x.size for x in jax.tree.leaves(lora_params))
