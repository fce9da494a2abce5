"""Building blocks shared by GPT-2 and Llama.

Letters: B batch, T query length, S key length (prefix included), P prefix
length, D model width, N query heads, K key/value heads, H head width, F MLP
width, V vocab, L layers, R LoRA rank.

Attention takes the prefix keys/values explicitly and returns the keys/values of
its own positions; there is no hidden cache. LoRA lives in the variable
collection 'lora' ({'a': [in..., R], 'b': [R, out...]} per target, already
scaled by alpha/R, see metal_jax.lora): when the collection is present the
module computes the PGM, when it is absent the frozen LM, from the same params.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metal_jax import sharding

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_fast': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


class KV(NamedTuple):
  """Per-layer keys and values, each [L, B, P, K, H] (a prefix) or [L, B, T, K, H] (an output).

  Llama keys are rotated for their positions, exactly as an HF cache holds them;
  `k_raw` (outputs only, Llama) holds the keys before RoPE.
  """
  k: Array
  v: Array
  k_raw: Array | None = None


def param(mdl: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
          init: Callable = nn.initializers.normal(0.02)) -> Array:
  """A parameter carrying logical axis names, cast to the module's compute dtype."""
  cfg = mdl.config
  p = mdl.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)
  return jnp.asarray(p, cfg.jnp_dtype)


def contract(x: Array, w: Array, axes: int) -> Array:
  """tensordot(x, w, axes): x [..., in...] (`axes` trailing dims) @ w [in..., out...].

  In a 16-bit dtype each product (and both gradients) is accumulated in float32 and returned
  in x's dtype: what accelerators do anyway, and on XLA:CPU what keeps the matmuls, forward
  and backward, in bfloat16: a bf16 x bf16 -> bf16 dot is computed there as a float32 dot of
  converted copies (~3x slower here), bf16 inputs with a float32 result as a native bf16
  matmul. float32 is jnp.tensordot itself.
  """
  if x.dtype == jnp.float32:
    return jnp.tensordot(x, w, axes=axes)
  return _mixed_contract(x, w, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_contract(x, w, axes):
  return _contract(x, w, axes)


def _contract(x, w, axes):
  return jnp.tensordot(x, w, axes=axes, preferred_element_type=jnp.float32).astype(x.dtype)


def _contract_fwd(x, w, axes):
  return _contract(x, w, axes), (x, w)


def _contract_bwd(axes, res, g):
  x, w = res
  g = g.astype(x.dtype)
  n_out = w.ndim - axes
  lead = x.ndim - axes
  out_g = tuple(range(g.ndim - n_out, g.ndim))
  dx = jnp.tensordot(g, w, axes=(out_g, tuple(range(axes, w.ndim))),
                     preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.tensordot(x, g, axes=(tuple(range(lead)), tuple(range(lead))),
                     preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_mixed_contract.defvjp(_contract_fwd, _contract_bwd)


def lora_delta(mdl: nn.Module, target: str, x: Array) -> Array | None:
  """The LoRA update x @ A @ B for `target`, or None when no LoRA pytree is given."""
  if not mdl.has_variable('lora', target):
    return None
  ab = mdl.get_variable('lora', target)
  a = jnp.asarray(ab['a'], x.dtype)  # [in..., R]
  b = jnp.asarray(ab['b'], x.dtype)  # [R, out...]
  return contract(contract(x, a, a.ndim - 1), b, 1)


# While a module is initialised, every LoRA target it passes through records the shapes of its
# A [in..., 1] and B [1, out...] in this collection: lora.init reads them (via jax.eval_shape), so
# LoRA shapes come from the module itself and a target that meets no kernel is known.
LORA_SHAPES = 'lora_shapes'


def add_lora(mdl: nn.Module, target: str, x: Array, y: Array) -> Array:
  """y + the LoRA update of `target` (x [B, T, in...] -> y [B, T, out...])."""
  if mdl.is_mutable_collection(LORA_SHAPES):
    mdl.sow(LORA_SHAPES, target, {'a': jnp.zeros(x.shape[2:] + (1,), jnp.float32),
                                  'b': jnp.zeros((1,) + y.shape[2:], jnp.float32)})
  d = lora_delta(mdl, target, x)
  return y if d is None else y + d


def dense(mdl: nn.Module, name: str, x: Array, in_axes: tuple[str, ...],
          out_shape: tuple[int, ...], out_axes: tuple[str, ...], *, use_bias: bool,
          lora_target: str | None = None) -> Array:
  """x [..., in...] @ kernel [in..., out...] (+ bias) (+ LoRA), kernel stored as param `name`."""
  sub = _Dense(mdl.config, in_axes, out_shape, out_axes, use_bias, name=name)
  y = sub(x)
  return y if lora_target is None else add_lora(mdl, lora_target, x, y)


class _Dense(nn.Module):
  config: Any
  in_axes: tuple[str, ...]
  out_shape: tuple[int, ...]
  out_axes: tuple[str, ...]
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_axes)
    kernel = param(self, 'kernel', x.shape[-n_in:] + self.out_shape, self.in_axes + self.out_axes)
    x = jnp.asarray(x, self.config.jnp_dtype)
    y = contract(x, kernel, n_in)
    if self.use_bias:
      y = y + param(self, 'bias', self.out_shape, self.out_axes, nn.initializers.zeros)
    return y


class RMSNorm(nn.Module):
  """Llama's RMSNorm, computed in float32 as transformers does."""
  config: Any
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.config.jnp_param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.config.jnp_dtype) * xf.astype(self.config.jnp_dtype)


class LayerNorm(nn.Module):
  """GPT-2's LayerNorm (statistics in float32)."""
  config: Any
  eps: float

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (d,), self.config.jnp_param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      (d,), self.config.jnp_param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.config.jnp_dtype)


def attention_mask(attention_mask: Array, prefix_len: int, prefix_mask: Array | None = None
                   ) -> Array:
  """Boolean mask [B, 1, T, S]: causal over the input, the prefix's slots visible (all, or where
  prefix_mask [B, P] is true: a padded prefix, e.g. a cache or contexts of several lengths in one
  batch), padding hidden."""
  b, t = attention_mask.shape
  visible = (jnp.ones((b, prefix_len), bool) if prefix_mask is None
             else jnp.broadcast_to(prefix_mask.astype(bool), (b, prefix_len)))
  key_mask = jnp.concatenate([visible, attention_mask.astype(bool)], axis=1)  # [B, S]
  q_idx = jnp.arange(t)[:, None]
  k_idx = jnp.arange(prefix_len + t)[None, :] - prefix_len
  causal = k_idx <= q_idx  # [T, S]; prefix slots have k_idx < 0
  return key_mask[:, None, None, :] & causal[None, None]


def attend(q: Array, k: Array, v: Array, mask: Array, prefix: KV | None = None) -> Array:
  """Grouped-query attention over [prefix ; this input]: q [B, T, N, H], k/v [B, T, K, H],
  prefix KV of [G, P, K, H], mask [B, 1, T, P + T] -> [B, T, N, H].

  G is B (a prefix per row: training's prompts, concatenated before the keys) or divides B:
  rows b * B/G .. (b + 1) * B/G - 1 share prefix row b, which is never copied per row (scoring
  many queries against one encoded context); the softmax then spans both parts with one max and
  one normaliser. Softmax is taken in float32; fully masked rows (left padding) give zeros, not
  NaN. Head-major [B, N, T, S] scores with the mask as an additive bias: measured 1.8x faster
  (forward + backward) than contracting [B, T, N, H] in place with two selects, 9% of the
  GPT-2-small training step (issue 15's note). Grouped keys/values are repeated to N heads first
  (small next to the scores).
  """
  b, t, n, h = q.shape
  heads = lambda a: jnp.swapaxes(  # [., S, K, H] -> [., N, S, H]
      a if n == a.shape[2] else jnp.repeat(a, n // a.shape[2], axis=2), 1, 2)
  g = b if prefix is None else prefix.k.shape[0]
  if b % g:
    raise ValueError(f'attend: {g} prefix rows do not divide a batch of {b} rows')
  if prefix is not None and g == b:
    k = jnp.concatenate([jnp.asarray(prefix.k, k.dtype), k], axis=1)
    v = jnp.concatenate([jnp.asarray(prefix.v, v.dtype), v], axis=1)
    prefix = None
  qh = jnp.swapaxes(q, 1, 2)  # [B, N, T, H]
  # A masked score becomes float32's minimum (a score's own size vanishes beside it), so its
  # probability is exactly 0 in any row with one visible key.
  bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, T, S]
  p_len = 0 if prefix is None else prefix.k.shape[1]
  scores = jnp.einsum('bnth,bnsh->bnts', qh, heads(k),
                      preferred_element_type=jnp.float32) * (h ** -0.5) + bias[..., p_len:]
  if prefix is None:
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bnts,bnsh->bnth', probs, heads(v))
  else:
    # Shared prefix rows: the B/G rows of a group are one batch of R*T queries against the
    # group's [N, P, H] keys; scores stay [G, N, R*T, P] (no per-row copy, no transpose of
    # anything P wide), only the per-query max and normaliser cross between the two layouts.
    r = b // g

    def to_g(a):  # [B, M, T, ...] -> [G, M, R*T, ...]
      m = a.shape[1]
      return a.reshape(g, r, m, t, *a.shape[3:]).swapaxes(1, 2).reshape(g, m, r * t,
                                                                          *a.shape[3:])

    def from_g(a):  # [G, M, R*T, ...] -> [B, M, T, ...]
      m = a.shape[1]
      return a.reshape(g, m, r, t, *a.shape[3:]).swapaxes(1, 2).reshape(b, m, t, *a.shape[3:])

    pre_bias = to_g(bias[..., :p_len])  # [G, 1, R*T, P]
    pre = jnp.einsum('gnqh,gnsh->gnqs', to_g(qh), heads(jnp.asarray(prefix.k, k.dtype)),
                     preferred_element_type=jnp.float32) * (h ** -0.5) + pre_bias
    top = jax.lax.stop_gradient(jnp.maximum(from_g(pre.max(-1)), scores.max(-1)))  # [B, N, T]
    e_pre = jnp.exp(pre - to_g(top)[..., None])
    e_in = jnp.exp(scores - top[..., None])
    norm = from_g(e_pre.sum(-1)) + e_in.sum(-1)  # [B, N, T]
    out_pre = from_g(jnp.einsum('gnqs,gnsh->gnqh', e_pre.astype(v.dtype),
                                heads(jnp.asarray(prefix.v, v.dtype))))
    out_in = jnp.einsum('bnts,bnsh->bnth', e_in.astype(v.dtype), heads(v))
    out = ((out_pre.astype(jnp.float32) + out_in.astype(jnp.float32))
           / norm[..., None]).astype(v.dtype)
  out = jnp.swapaxes(out, 1, 2)
  visible = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]: the row sees a key
  return jnp.where(visible, out, jnp.zeros((), out.dtype))


# What a rematerialised block keeps from its forward pass (the rest is recomputed backward):
# 'full' nothing; 'dots' every matmul's output; 'dots_no_batch' the matmuls without batch dimensions
# (the weight products, not attention's scores and mixing). None: no rematerialisation.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy(remat: bool | str):
  """config.remat -> (rematerialise?, policy); True / False mean 'full' / 'none'."""
  name = {True: 'full', False: 'none'}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f'config.remat={remat!r}: choose one of {list(REMAT_POLICIES)}')
  return name != 'none', REMAT_POLICIES[name]


ACTIVATION = ('activation_batch', 'activation_length', 'activation_embed')  # x [B, T, D]


def run_layers(block_cls, config, x: Array, positions: Array, mask: Array,
               prefix: KV | None, return_kv: bool) -> tuple[Array, KV | None]:
  """Applies config.n_layers blocks: a Python loop, or nn.scan (+ nn.remat) if config.scan_layers.

  Call from inside a compact method: the blocks become children of the caller,
  named `layers_{i}` (loop) or `layers` (scan, params stacked on a leading L axis).
  The residual stream is constrained to ACTIVATION at every block boundary (scan: on the
  loop's carry in and out, which fixes the carry's layout inside the loop).
  """
  x = sharding.constrain(x, ACTIVATION)
  n_layers = config.n_layers
  prefix_kv = None if prefix is None else KV(prefix.k, prefix.v)
  block = block_cls
  remat, policy = remat_policy(config.remat)
  if remat:
    block = nn.remat(block, prevent_cse=not config.scan_layers, policy=policy)
  if config.scan_layers:
    scanned = nn.scan(
        block, variable_axes={'params': 0, 'lora': 0, LORA_SHAPES: 0}, split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0), length=n_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x, kv = scanned(config, return_kv, name='layers')(x, positions, mask, prefix_kv)
    return sharding.constrain(x, ACTIVATION), kv
  outs = []
  for i in range(n_layers):
    layer_prefix = None if prefix_kv is None else jax.tree.map(lambda a, i=i: a[i], prefix_kv)
    x, kv = block(config, return_kv, name=f'layers_{i}')(x, positions, mask, layer_prefix)
    x = sharding.constrain(x, ACTIVATION)
    outs.append(kv)
  if not return_kv:
    return x, None
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
