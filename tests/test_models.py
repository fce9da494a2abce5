"""GPT-2 and Llama (metal_jax.models) against transformers' PyTorch models.

Tiny random HF models are built from configs (no hub access), their weights
perturbed so every parameter (norm scales and biases included) matters, saved
with `save_pretrained`, and loaded back through `metal_jax.models.hf.load_lm`.

Run with `pytest -s` to see the measured max |Δ| of every parity case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

from metal_jax.models import KV, GPT2Config, LlamaConfig, config_from_hf
from metal_jax.models import rope as rope_lib
from metal_jax.models.hf import load_lm

VOCAB = 100
B, T, N_PAD = 2, 10, 3  # batch, length; row 1 has its last N_PAD tokens padded (right padding)
F32_TOL = 1e-4  # float32 parity against PyTorch
SELF_TOL = 1e-5  # our model against itself (prefix vs concatenation, scan vs loop)

# ---------------------------------------------------------------------------------------------
# Model cases
# ---------------------------------------------------------------------------------------------

LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16}


def _llama(n_kv, rope=None, theta=10000.0, tied=False, **kw):
  rope_parameters = {'rope_type': 'default', **(rope or {}), 'rope_theta': theta}
  return transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_parameters=rope_parameters, tie_word_embeddings=tied,
      initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


CASES = {
    'gpt2': lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # MHA, default RoPE, untied head
    'llama_mha': lambda: _llama(4),
    # GQA (2 groups of 2), linear RoPE scaling, tied head
    'llama_gqa_linear_tied': lambda: _llama(2, {'rope_type': 'linear', 'factor': 2.0}, tied=True),
    # MQA, llama3 RoPE scaling, theta 500000, untied head
    'llama_mqa_llama3': lambda: _llama(1, LLAMA3, theta=500000.0),
    # GQA, llama3 RoPE, tied head, q/k/v/o and MLP biases
    'llama_gqa_llama3_bias_tied': lambda: _llama(2, LLAMA3, theta=500000.0, tied=True,
                                                 attention_bias=True, mlp_bias=True),
}
LLAMA_CASES = [c for c in CASES if c.startswith('llama')]


def _build_hf(name):
  torch.manual_seed(sum(map(ord, name)))
  cfg = CASES[name]()
  cls = (transformers.GPT2LMHeadModel if isinstance(cfg, transformers.GPT2Config)
         else transformers.LlamaForCausalLM)
  model = cls._from_config(cfg, attn_implementation='eager', dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    # Norm scales start at 1 and biases at 0: perturb everything so they are tested.
    for p in model.parameters():  # shared (tied) tensors appear once
      p.add_(0.05 * torch.randn_like(p))
  if getattr(cfg, 'tie_word_embeddings', True):
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
  return model


class _Models:
  """Builds and saves each HF model once per session; loads our model per (case, options)."""

  def __init__(self, tmp_path_factory):
    self.tmp = tmp_path_factory
    self.hf = {}
    self.paths = {}
    self._ours = {}

  def torch_model(self, name):
    if name not in self.hf:
      model = _build_hf(name)
      path = self.tmp.mktemp(name)
      model.save_pretrained(path)
      self.hf[name], self.paths[name] = model, path
    return self.hf[name]

  def path(self, name):
    self.torch_model(name)
    return self.paths[name]

  def ours(self, name, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in self._ours:
      self._ours[key] = load_lm(str(self.path(name)), **kw)
    return self._ours[key]


@pytest.fixture(scope='session')
def models(tmp_path_factory):
  return _Models(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _batch(seed=0, b=B, t=T, pad=N_PAD):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  if pad:
    mask[1, t - pad:] = 0
    ids[1, t - pad:] = 0  # a pad id; its value must not matter at real positions
  return ids, mask


@functools.lru_cache(maxsize=None)
def _jitted(module, **static):
  """jit(module.apply) with static keyword options (modules are hashable dataclasses)."""
  def run(params, ids, mask, prefix=None):
    return module.apply({'params': params}, ids, mask, prefix, **dict(static))
  return jax.jit(run)


def _apply(lm, ids, mask, prefix=None, **static):
  return _jitted(lm.module, **static)(lm.params, jnp.asarray(ids), jnp.asarray(mask), prefix)


def _torch_forward(model, ids, mask, **kw):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                 attention_mask=torch.as_tensor(mask, dtype=torch.long), **kw)


def _max_diff_real(a, b, mask):
  """max |a - b| over positions where mask == 1 (a, b: [B, T, ...])."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sel = np.asarray(mask).astype(bool)
  return float(np.max(np.abs(a[sel] - b[sel])))


def _torch_cache(k, v):
  """A DynamicCache from our prefix layout [L, B, P, K, H] -> per-layer [B, K, P, H]."""
  k = torch.as_tensor(np.asarray(k)).permute(0, 1, 3, 2, 4)
  v = torch.as_tensor(np.asarray(v)).permute(0, 1, 3, 2, 4)
  return transformers.DynamicCache([(k[i].contiguous(), v[i].contiguous())
                                    for i in range(k.shape[0])])


def _report(what, value, tol):
  print(f'\n  {what}: max|Δ| = {value:.3e} (tol {tol:.1e})', end='')


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(CASES))
def test_load_config(models, name):
  """load_lm reads the config faithfully (architecture fields, RoPE, tying, compute options)."""
  hf_cfg = models.torch_model(name).config
  lm = load_lm(str(models.path(name)))
  cfg = lm.config
  assert cfg.model_type == hf_cfg.model_type
  assert (cfg.dtype, cfg.param_dtype, cfg.scan_layers, cfg.remat) == ('float32', 'float32',
                                                                        False, False)
  assert cfg.n_layers == 2 and cfg.d_model == 32 and cfg.vocab_size == VOCAB and cfg.n_heads == 4
  assert all(np.dtype(x.dtype) == np.float32 for x in jax.tree.leaves(lm.params))
  assert lm.tokenizer is None  # save_pretrained of a bare model writes no tokenizer files
  if name == 'gpt2':
    assert isinstance(cfg, GPT2Config)
  else:
    assert isinstance(cfg, LlamaConfig)
    assert cfg.n_kv_heads == hf_cfg.num_key_value_heads
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert (cfg.attention_bias, cfg.mlp_bias) == (hf_cfg.attention_bias, hf_cfg.mlp_bias)
    assert cfg.rope_theta == hf_cfg.rope_parameters['rope_theta']
    # An untied Llama has an lm_head parameter, a tied one must not.
    assert ('lm_head' in lm.params) == (not hf_cfg.tie_word_embeddings)
  # The same config through config_from_hf(config.json dict) gives the same result.
  assert config_from_hf(hf_cfg.to_dict()) == cfg
  lm2 = load_lm(str(models.path(name)), dtype='bfloat16', param_dtype='bfloat16',
                scan_layers=True, remat=True)
  assert (lm2.config.dtype, lm2.config.param_dtype, lm2.config.scan_layers,
          lm2.config.remat) == ('bfloat16', 'bfloat16', True, True)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lm2.params))


@pytest.mark.parametrize('name', LLAMA_CASES)
def test_rope_inv_freq_matches_transformers(models, name):
  """config.inv_freq equals the inv_freq buffer of HF's rotary embedding (default/linear/llama3)."""
  hf_model = models.torch_model(name)
  ours = np.asarray(models.ours(name).config.inv_freq)
  ref = hf_model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize('rope', [
    None,
    {'rope_type': 'linear', 'factor': 4.0},
    LLAMA3,
    # head_dim 8, theta 100, original context 32: wavelengths 6.3 (< 8, kept), 19.9 (between 8
    # and 32, smoothed), 62.8 and 199 (> 32, divided by factor) -- all three llama3 branches.
    {**LLAMA3, 'original_max_position_embeddings': 32},
])
@pytest.mark.parametrize('theta', [100.0, 10000.0, 500000.0])
def test_rope_inv_freq_grid(rope, theta):
  hf_cfg = _llama(2, rope, theta=theta)
  ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg).inv_freq.numpy()
  ours = config_from_hf(hf_cfg.to_dict()).inv_freq
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# 1. float32 logits parity (right padding)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(CASES))
def test_logits_parity_float32(models, name):
  hf_model = models.torch_model(name)
  lm = models.ours(name)
  ids, mask = _batch(seed=1)
  ref = _torch_forward(hf_model, ids, mask, output_hidden_states=True)
  out = _apply(lm, ids, mask, return_hidden=True)
  assert out.logits.dtype == jnp.float32 and out.logits.shape == (B, T, VOCAB)
  scale = float(np.abs(ref.logits.numpy()).max())
  assert scale > 1.0, f'logits too small to be a meaningful test: {scale}'
  d = _max_diff_real(out.logits, ref.logits.numpy(), mask)
  _report(f'{name} float32 logits (|logits| max {scale:.2f})', d, F32_TOL)
  assert d <= F32_TOL
  # `hidden` is what enters the LM head: HF's last hidden state (after the final norm).
  dh = _max_diff_real(out.hidden, ref.hidden_states[-1].numpy(), mask)
  assert dh <= F32_TOL, dh
  # Padding does not leak: row 1's real positions equal a run on the unpadded row alone.
  t1 = T - N_PAD
  alone = _apply(lm, ids[1:2, :t1], mask[1:2, :t1])
  np.testing.assert_allclose(np.asarray(out.logits[1, :t1]), np.asarray(alone.logits[0]),
                             atol=SELF_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# 2. bfloat16
# ---------------------------------------------------------------------------------------------

# The tolerance is relative to the logit scale (max |logit| of the float32 reference, ~2-2.7 for
# these models). bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); the
# measured error over 2 layers, the softmax and the head is 0.8-1.6% of the scale (see
# `pytest -s`), so 3% leaves ~2x margin. It is set below the effect of subtle bugs, measured in
# float32 on the same inputs: RoPE dropped altogether 4.5%, one layer's q bias dropped 5.1%, one
# RMSNorm scale ignored 3.8%, GPT-2's ln_f bias dropped 3.8% (a missing RoPE scaling: 17-25%).
BF16_REL_TOL = 0.03


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', list(CASES))
def test_logits_bfloat16(models, name, param_dtype):
  hf_model = models.torch_model(name)
  lm = models.ours(name, dtype='bfloat16', param_dtype=param_dtype)
  assert lm.config.dtype == 'bfloat16' and lm.config.param_dtype == param_dtype
  assert all(np.dtype(x.dtype) == np.dtype(jnp.dtype(param_dtype))
             for x in jax.tree.leaves(lm.params))
  ids, mask = _batch(seed=2)
  ref = _torch_forward(hf_model, ids, mask).logits.numpy()
  out = _apply(lm, ids, mask, return_kv=True)
  assert out.logits.dtype == jnp.float32  # the head accumulates in float32
  assert out.kv.k.dtype == jnp.bfloat16 and out.kv.v.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out.logits)).all()
  scale = float(np.abs(ref).max())
  d = _max_diff_real(out.logits, ref, mask)
  _report(f'{name} bfloat16 (params {param_dtype}) logits, |logits| max {scale:.2f}, '
          f'rel {d / scale:.3f}', d, BF16_REL_TOL * scale)
  assert d <= BF16_REL_TOL * scale
  # The bf16 model still agrees with float32 on the argmax for the vast majority of positions.
  agree = (np.asarray(out.logits).argmax(-1) == ref.argmax(-1))[mask.astype(bool)].mean()
  assert agree >= 0.8, agree


# ---------------------------------------------------------------------------------------------
# 3. Prefix parity against transformers' past_key_values
# ---------------------------------------------------------------------------------------------

PREFIX_CASES = ['gpt2', 'llama_gqa_linear_tied', 'llama_mqa_llama3']


@pytest.mark.parametrize('padded', [False, True], ids=['full', 'right_padded'])
@pytest.mark.parametrize('name', PREFIX_CASES)
def test_prefix_parity(models, name, padded):
  hf_model = models.torch_model(name)
  lm = models.ours(name)
  cfg = lm.config
  p = 3
  rng = np.random.default_rng(3)
  shape = (cfg.n_layers, B, p, cfg.n_kv_heads, cfg.head_dim)
  k = rng.normal(size=shape).astype(np.float32)
  v = rng.normal(size=shape).astype(np.float32)
  ids, mask = _batch(seed=4, pad=N_PAD if padded else 0)
  hf_mask = np.concatenate([np.ones((B, p), np.int32), mask], axis=1)  # [B, P + T]
  ref = _torch_forward(hf_model, ids, hf_mask, past_key_values=_torch_cache(k, v), use_cache=True)
  out = _apply(lm, ids, mask, KV(jnp.asarray(k), jnp.asarray(v)), return_kv=True)
  d = _max_diff_real(out.logits, ref.logits.numpy(), mask)
  _report(f'{name} prefix P={p} ({"right padded" if padded else "full"}) logits', d, F32_TOL)
  assert d <= F32_TOL
  # The returned kv covers the input only; HF's cache holds prefix + input.
  assert out.kv.k.shape == (cfg.n_layers, B, T, cfg.n_kv_heads, cfg.head_dim)
  for i, layer in enumerate(ref.past_key_values.layers):
    hk = layer.keys.permute(0, 2, 1, 3).numpy()  # [B, P + T, K, H]
    hv = layer.values.permute(0, 2, 1, 3).numpy()
    np.testing.assert_array_equal(hk[:, :p], k[i])
    assert _max_diff_real(out.kv.k[i], hk[:, p:], mask) <= F32_TOL
    assert _max_diff_real(out.kv.v[i], hv[:, p:], mask) <= F32_TOL
  # The prefix is actually attended to: without it the logits differ.
  plain = _apply(lm, ids, mask)
  assert _max_diff_real(plain.logits, out.logits, mask) > 1e-2


# ---------------------------------------------------------------------------------------------
# 4. Prefix self-consistency: LM(x | kv(c)) == LM(concat(c, x))[x positions]
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['gpt2', 'llama_mha', 'llama_mqa_llama3'])
def test_prefix_self_consistency(models, name):
  lm = models.ours(name)
  tc, tx = 5, 6
  rng = np.random.default_rng(5)
  c = rng.integers(0, VOCAB, (B, tc)).astype(np.int32)
  x = rng.integers(0, VOCAB, (B, tx)).astype(np.int32)
  ones = lambda t: np.ones((B, t), np.int32)
  ctx = _apply(lm, c, ones(tc), return_kv=True)
  cont = _apply(lm, x, ones(tx), KV(ctx.kv.k, ctx.kv.v))
  full = _apply(lm, np.concatenate([c, x], 1), ones(tc + tx), return_kv=True)
  d = float(jnp.max(jnp.abs(cont.logits - full.logits[:, tc:])))
  _report(f'{name} prefix vs concatenation logits', d, SELF_TOL)
  assert d <= SELF_TOL
  # The context's kv are the first tc positions of the concatenation's.
  np.testing.assert_allclose(np.asarray(ctx.kv.k), np.asarray(full.kv.k[:, :, :tc]),
                             atol=SELF_TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ctx.kv.v), np.asarray(full.kv.v[:, :, :tc]),
                             atol=SELF_TOL, rtol=0)


@pytest.mark.parametrize('name', ['gpt2', 'llama_mqa_llama3'])
def test_padded_prefix_with_mask_equals_the_unpadded_prefix(models, name):
  """A prefix padded after each row's own context (rows of different context lengths in one
  batch, as the scoring table and the generation cache hold them), hidden by prefix_mask, with
  positions continuing each row's visible length, gives what each row's unpadded prefix gives."""
  lm = models.ours(name)
  lens, tx, width = (2, 5), 4, 7  # row 0's context is 2 tokens, row 1's 5; the table 7 wide
  rng = np.random.default_rng(6)
  x = rng.integers(0, VOCAB, (B, tx)).astype(np.int32)
  ones = lambda t: np.ones((1, t), np.int32)
  ks, vs, pmask, want = [], [], np.zeros((B, width), np.int32), []
  for r, n in enumerate(lens):
    c = rng.integers(0, VOCAB, (1, n)).astype(np.int32)
    ctx = _apply(lm, c, ones(n), return_kv=True).kv  # [L, 1, n, K, H]
    want.append(_apply(lm, x[r:r + 1], ones(tx), KV(ctx.k, ctx.v)).logits[0])
    pad = [(0, 0), (0, 0), (0, width - n), (0, 0), (0, 0)]
    ks.append(np.pad(np.asarray(ctx.k), pad, constant_values=7.0))  # garbage in the padding
    vs.append(np.pad(np.asarray(ctx.v), pad, constant_values=-7.0))
    pmask[r, :n] = 1
  prefix = KV(jnp.asarray(np.concatenate(ks, 1)), jnp.asarray(np.concatenate(vs, 1)))
  positions = np.asarray(lens)[:, None] + np.arange(tx)[None]
  got = jax.jit(lambda p, ids, pre, pm, pos: lm.module.apply(
      {'params': p}, ids, jnp.ones_like(ids), pre, prefix_mask=pm, positions=pos))(
          lm.params, jnp.asarray(x), prefix, jnp.asarray(pmask), jnp.asarray(positions))
  d = float(np.max(np.abs(np.asarray(got.logits) - np.stack([np.asarray(w) for w in want]))))
  _report(f'{name} padded prefix + prefix_mask vs unpadded', d, SELF_TOL)
  assert d <= SELF_TOL


# ---------------------------------------------------------------------------------------------
# 5. nn.scan (+ remat) equals the Python loop
# ---------------------------------------------------------------------------------------------


def _stack_loop_layers(tree, n_layers):
  """Loop layout {layers_0: ..., layers_1: ...} -> scan layout {layers: stacked on axis 0}."""
  tree = dict(tree)
  per_layer = [tree.pop(f'layers_{i}') for i in range(n_layers)]
  assert not any(k.startswith('layers_') for k in tree)
  tree['layers'] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  return tree


@pytest.mark.parametrize('name', ['gpt2', 'llama_gqa_llama3_bias_tied', 'llama_mqa_llama3'])
def test_scan_equals_loop(models, name):
  loop = models.ours(name)
  scan = models.ours(name, scan_layers=True, remat=True)
  assert scan.config.scan_layers and scan.config.remat
  n_layers = loop.config.n_layers
  # Same weights, different layout.
  stacked = _stack_loop_layers(loop.params, n_layers)
  assert jax.tree.structure(stacked) == jax.tree.structure(scan.params)
  jax.tree.map(np.testing.assert_array_equal, stacked, scan.params)

  ids, mask = _batch(seed=6)
  a = _apply(loop, ids, mask, return_kv=True)
  b = _apply(scan, ids, mask, return_kv=True)
  d = float(jnp.max(jnp.abs(a.logits - b.logits)))
  _report(f'{name} scan+remat vs loop logits', d, SELF_TOL)
  assert d <= SELF_TOL
  assert (a.kv.k_raw is None) == (b.kv.k_raw is None) == (name == 'gpt2')
  for x, y in zip(a.kv, b.kv):
    if x is not None:
      assert x.shape == y.shape
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=SELF_TOL, rtol=0)

  # With a prefix as well (scan slices the prefix per layer).
  cfg = loop.config
  rng = np.random.default_rng(7)
  shape = (n_layers, B, 3, cfg.n_kv_heads, cfg.head_dim)
  pre = KV(jnp.asarray(rng.normal(size=shape), jnp.float32),
           jnp.asarray(rng.normal(size=shape), jnp.float32))
  d = float(jnp.max(jnp.abs(_apply(loop, ids, mask, pre).logits
                            - _apply(scan, ids, mask, pre).logits)))
  assert d <= SELF_TOL, d

  # Gradients of a scalar loss w.r.t. the params (mapped between layouts) and input embeddings.
  emb = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)) * 0.1, jnp.float32)
  mask_j = jnp.asarray(mask)

  def loss(params, embeds, module):
    out = module.apply({'params': params}, None, mask_j, pre, input_embeds=embeds)
    return jnp.sum(jnp.where(mask_j[..., None] > 0, out.logits, 0.0) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  gp_loop, ge_loop = grad(loop.params, emb, loop.module)
  gp_scan, ge_scan = grad(scan.params, emb, scan.module)
  gscale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gp_loop))
  gd = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))),
                                    _stack_loop_layers(gp_loop, n_layers), gp_scan))
  ed = float(jnp.max(jnp.abs(ge_loop - ge_scan)))
  _report(f'{name} scan+remat vs loop grads (|grad| max {gscale:.2f})', max(gd), SELF_TOL * gscale)
  assert max(gd) <= SELF_TOL * gscale
  assert ed <= SELF_TOL * max(1.0, float(jnp.max(jnp.abs(ge_loop))))
  assert float(jnp.max(jnp.abs(ge_loop))) > 0


@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_equal_no_remat(models, remat):
  """A remat policy changes what the backward pass recomputes, never the numbers."""
  base = models.ours('llama_gqa_llama3_bias_tied')
  other = models.ours('llama_gqa_llama3_bias_tied', scan_layers=True, remat=remat)
  ids, mask = _batch(seed=9)
  mask_j = jnp.asarray(mask)

  def loss(params, module):
    out = module.apply({'params': params}, jnp.asarray(ids), mask_j)
    return jnp.sum(jnp.where(mask_j[..., None] > 0, out.logits, 0.0) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (la, ga), (lb, gb) = grad(base.params, base.module), grad(other.params, other.module)
  gscale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ga))
  d = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))),
                                       _stack_loop_layers(ga, base.config.n_layers), gb)))
  assert abs(float(la) - float(lb)) <= SELF_TOL * abs(float(la)) and d <= SELF_TOL * gscale
  with pytest.raises(ValueError, match=r"config.remat='some': choose one of"):
    base.config.replace(remat='some')


# ---------------------------------------------------------------------------------------------
# 6. Returned kv equals transformers' cache; k_raw rotated by RoPE equals k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(CASES))
def test_kv_matches_hf_cache(models, name):
  hf_model = models.torch_model(name)
  lm = models.ours(name)
  cfg = lm.config
  ids, mask = _batch(seed=8)
  ref = _torch_forward(hf_model, ids, mask, use_cache=True)
  out = _apply(lm, ids, mask, return_kv=True)
  shape = (cfg.n_layers, B, T, cfg.n_kv_heads, cfg.head_dim)
  assert out.kv.k.shape == shape and out.kv.v.shape == shape
  layers = ref.past_key_values.layers
  assert len(layers) == cfg.n_layers
  dk = max(_max_diff_real(out.kv.k[i], layers[i].keys.permute(0, 2, 1, 3).numpy(), mask)
           for i in range(cfg.n_layers))
  dv = max(_max_diff_real(out.kv.v[i], layers[i].values.permute(0, 2, 1, 3).numpy(), mask)
           for i in range(cfg.n_layers))
  _report(f'{name} kv vs HF cache (k, v)', max(dk, dv), F32_TOL)
  assert dk <= F32_TOL and dv <= F32_TOL
  if name == 'gpt2':
    assert out.kv.k_raw is None
    return
  assert out.kv.k_raw.shape == shape
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  for i in range(cfg.n_layers):
    rotated = rope_lib.apply_rope(out.kv.k_raw[i], positions, cfg.inv_freq)
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(out.kv.k[i]), atol=1e-6, rtol=0)
  # Position 0 is not rotated at all.
  np.testing.assert_allclose(np.asarray(out.kv.k_raw[:, :, 0]), np.asarray(out.kv.k[:, :, 0]),
                             atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(out.kv.k_raw[:, :, 1:] - out.kv.k[:, :, 1:]))) > 1e-3


# ---------------------------------------------------------------------------------------------
# 7. layers.contract: float32 is tensordot; bfloat16 accumulates in float32, gradients too
# ---------------------------------------------------------------------------------------------


def test_contract_is_tensordot_in_float32_and_accumulates_bfloat16_in_float32():
  from metal_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 6, 7)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(2, 3, 6, 7)), jnp.float32)

  def grads(fn, x, w):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(ct.astype(y.dtype)))

  ours = grads(lambda x, w: layers.contract(x, w, 2), x, w)
  ref = grads(lambda x, w: jnp.tensordot(x, w, axes=2), x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # bfloat16: output and gradients in bf16, each the float32 result rounded once.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y, dx, dw = grads(lambda x, w: layers.contract(x, w, 2), xb, wb)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  f32 = grads(lambda x, w: jnp.tensordot(x, w, axes=2), xb.astype(jnp.float32),
              wb.astype(jnp.float32))
  ct_b = ct.astype(jnp.bfloat16).astype(jnp.float32)
  exact = (f32[0], jnp.tensordot(ct_b, wb.astype(jnp.float32), axes=((2, 3), (2, 3))),
           jnp.tensordot(xb.astype(jnp.float32), ct_b, axes=((0, 1), (0, 1))))
  for got, want in zip((y, dx, dw), exact):  # within one bf16 rounding (accumulation order)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2 ** -7,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. layers.attend: the head-major additive-bias kernel equals attention written out plainly
# ---------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, mask):
  """Grouped-query attention in float64 numpy, one (row, head, query) at a time."""
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  out = np.zeros((b, t, n, h))
  for i in range(b):
    for j in range(n):
      for s in range(t):
        visible = mask[i, 0, s]
        if not visible.any():
          continue  # a fully masked row (left padding) gives zeros
        logits = k[i, visible, j // groups] @ q[i, s, j] / np.sqrt(h)
        p = np.exp(logits - logits.max())
        out[i, s, j] = (p / p.sum()) @ v[i, visible, j // groups]
  return out


@pytest.mark.parametrize('n_kv', [4, 2])
def test_attend_equals_reference_attention_with_its_gradients(n_kv):
  """layers.attend (MHA and GQA, a prefix, left padding with fully masked rows): values against a
  float64 loop, gradients against attention written plainly with selects (float32, 1e-5)."""
  from metal_jax.models import layers
  rng = np.random.default_rng(1)
  b, t, p, n, h = 2, 6, 3, 4, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, p + t, n_kv, h)).astype(np.float32)
  v = rng.normal(size=(b, p + t, n_kv, h)).astype(np.float32)
  am = np.ones((b, t), bool)
  am[1, :2] = False  # row 1 is left-padded by 2
  mask = np.array(layers.attention_mask(jnp.asarray(am), p))
  mask[1, :, :2] = False  # ... and its padded queries see nothing (as the PGM's X^P without slots)
  got = np.asarray(layers.attend(*map(jnp.asarray, (q, k, v, mask))))
  want = _reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                              mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not got[1, :2].any()  # fully masked rows are exact zeros

  def plain(q, k, v):  # the same attention in jax with selects, the pre-issue-15 formulation
    g = n // n_kv
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum('btnh,bsnh->bnts', q, kk) / np.sqrt(h)
    s = jnp.where(mask, s, -jnp.inf)
    w = jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1), 0.0)
    return jnp.einsum('bnts,bsnh->btnh', w, vv)

  ct = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
  args = tuple(map(jnp.asarray, (q, k, v)))
  _, vjp_ours = jax.vjp(lambda *a: layers.attend(*a, jnp.asarray(mask)), *args)
  _, vjp_plain = jax.vjp(plain, *args)
  for name, a, r in zip('qkv', vjp_ours(ct), vjp_plain(ct)):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5 * scale,
                               err_msg=f'd{name}')
  assert not np.asarray(vjp_ours(ct)[0])[1, :2].any()  # no gradient into a masked query


@pytest.mark.parametrize('n_kv', [4, 2])
@pytest.mark.parametrize('groups', [1, 2, 6])
def test_attend_with_a_shared_prefix_equals_the_concatenation(n_kv, groups):
  """attend(q, k, v, mask, prefix) with G = B / groups prefix rows (row b reads prefix row
  b // groups) equals attending over [the row's prefix ; k] concatenated, in value and in every
  gradient (the prefix's included)."""
  from metal_jax.models import layers
  rng = np.random.default_rng(2)
  b, t, p, n, h = 6, 5, 4, 4, 8
  g = b // groups  # groups rows share one prefix row
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, t, n_kv, h)), jnp.float32) for _ in range(2))
  pk, pv = (jnp.asarray(rng.normal(size=(g, p, n_kv, h)), jnp.float32) for _ in range(2))
  am = np.ones((b, t), bool)
  am[1, :2] = False
  pmask = np.ones((b, p), bool)
  pmask[2, 1:] = False  # row 2 sees one prefix slot
  pmask[1] = False  # row 1's padded queries see nothing at all
  mask = jnp.asarray(np.asarray(layers.attention_mask(jnp.asarray(am), p, jnp.asarray(pmask))))

  def shared(q, k, v, pk, pv):
    return layers.attend(q, k, v, mask, layers.KV(pk, pv))

  def concat(q, k, v, pk, pv):
    row = np.arange(b) // groups
    return layers.attend(q, jnp.concatenate([pk[row], k], 1), jnp.concatenate([pv[row], v], 1),
                         mask)

  args = (q, k, v, pk, pv)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  got, vjp_got = jax.vjp(shared, *args)
  want, vjp_want = jax.vjp(concat, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for name, a, r in zip(('q', 'k', 'v', 'prefix k', 'prefix v'), vjp_got(ct), vjp_want(ct)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(r))), err_msg=f'd {name}')
  if g > 1:
    with pytest.raises(ValueError, match='4 prefix rows do not divide a batch of 6'):
      layers.attend(q, k, v, mask, layers.KV(pk[:1].repeat(4, 0), pv[:1].repeat(4, 0)))
