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
from flax import traverse_util

from metal_jax import models
from metal_jax.models import layers

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


def kernel_shapes(model_cfg) -> dict[tuple[str, ...], dict]:
  """{(layer, submodule, target): {'a': [lead..., in..., 1], 'b': [lead..., 1, out...]}} of every
  LoRA target `model_cfg`'s module passes through (lead: [L] when layers are scanned), read from
  the module itself under jax.eval_shape (nothing is allocated)."""
  module = models.module_for(model_cfg)
  found = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  flat = traverse_util.flatten_dict(found.get(layers.LORA_SHAPES, {}))
  return {path: sown[0] for path, sown in flat.items()}  # sow keeps a tuple of one


def init(rng: jax.Array, model_cfg, cfg: LoraConfig, dtype=jnp.float32) -> dict:
  """A fresh LoRA pytree for `model_cfg`'s layer layout (loop or scan): A ~ U(±1/sqrt(fan_in)), B = 0.

  Raises ValueError naming a target that meets no kernel of the model (GPT-2 has no 'gate').
  """
  shapes = kernel_shapes(model_cfg)
  have = sorted({path[-1] for path in shapes}, key=(ATTN_TARGETS + MLP_TARGETS).index)
  missing = [t for t in cfg.targets if t not in have]
  if missing:
    raise ValueError(f'lora.targets={",".join(cfg.targets)}: {missing} match no kernel of this '
                     f'{model_cfg.model_type} model (its LoRA targets: {have})')
  lead = 1 if model_cfg.scan_layers else 0
  names = ['layers'] if lead else [f'layers_{i}' for i in range(model_cfg.n_layers)]
  out = {}
  for i, name in enumerate(names):
    key = rng if lead else jax.random.fold_in(rng, i)
    for j, t in enumerate(cfg.targets):
      (path, ab), = [(p, ab) for p, ab in shapes.items() if p[0] == name and p[-1] == t]
      a_shape, b_shape = ab['a'].shape[:-1], ab['b'].shape
      bound = 1.0 / math.sqrt(math.prod(a_shape[lead:]))
      a = jax.random.uniform(jax.random.fold_in(key, j), a_shape + (cfg.rank,), dtype, -bound,
                             bound)
      b = jnp.zeros(b_shape[:lead] + (cfg.rank,) + b_shape[lead + 1:], dtype)
      sub = out
      for part in path:
        sub = sub.setdefault(part, {})
      sub.update({'a': a, 'b': b})
  return out


def scaled(lora_params: dict, cfg: LoraConfig) -> dict:
  """The pytree the modules consume: B multiplied by alpha / rank (gradients flow as in LoRA)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * cfg.scale if path[-1].key == 'b' else x, lora_params)


def variables(params: dict, lora_params: dict | None, cfg: LoraConfig | None) -> dict:
  """Variables for module.apply: the frozen LM, plus the LoRA pytree when given (the PGM)."""
  if lora_params is None:
    return {'params': params}
  return {'params': params, 'lora': scaled(lora_params, cfg)}
