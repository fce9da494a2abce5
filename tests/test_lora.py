"""LoRA: zero B is the base model, nonzero B is not, gradients reach only the LoRA pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metal_jax
from metal_jax import lora


@pytest.fixture(params=['gpt2', 'llama'])
def lm(request, gpt2_dir, llama_dir):
  return metal_jax.load_lm(gpt2_dir if request.param == 'gpt2' else llama_dir)


IDS = jnp.asarray(np.random.RandomState(0).randint(0, 100, (2, 9)))


def logits(lm, lora_params=None, cfg=None):
  return lm.module.apply(lora.variables(lm.params, lora_params, cfg), IDS).logits


def test_zero_b_equals_base(lm):
  cfg = lora.LoraConfig(rank=4, targets=('q', 'k', 'v', 'o', 'up', 'down'))
  lp = lora.init(jax.random.key(0), lm.config, cfg)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(lp) if x.ndim and x.shape[-1] == 4)
  np.testing.assert_array_equal(logits(lm, lp, cfg), logits(lm))


def test_nonzero_b_changes_logits(lm):
  cfg = lora.LoraConfig(rank=4)
  lp = lora.init(jax.random.key(0), lm.config, cfg)
  lp = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if p[-1].key == 'b' else x, lp)
  delta = jnp.abs(logits(lm, lp, cfg) - logits(lm)).max()
  assert delta > 1e-3


def test_targets_and_scan_layout(llama_dir):
  cfg = lora.LoraConfig(rank=2, targets=('q', 'o', 'gate', 'down'))
  loop = metal_jax.load_lm(llama_dir)
  scan = metal_jax.load_lm(llama_dir, scan_layers=True)
  lp = lora.init(jax.random.key(0), loop.config, cfg)
  assert set(lp['layers_0']['attn']) == {'q', 'o'} and set(lp['layers_0']['mlp']) == {'gate', 'down'}
  assert lp['layers_0']['attn']['o']['a'].shape == (4, 8, 2)  # [N, H, R]
  lp_scan = lora.init(jax.random.key(0), scan.config, cfg)
  assert lp_scan['layers']['mlp']['down']['b'].shape == (2, 2, 32)  # [L, R, D]
  # The same nonzero adapter in both layouts gives the same logits.
  lp = jax.tree.map(lambda x: x + 0.05, lp)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), lp['layers_0'], lp['layers_1'])
  a = loop.module.apply(lora.variables(loop.params, lp, cfg), IDS).logits
  b = scan.module.apply(lora.variables(scan.params, {'layers': stacked}, cfg), IDS).logits
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_reaches_only_lora(lm):
  cfg = lora.LoraConfig(rank=4, targets=('q', 'v', 'up'))
  lp = lora.init(jax.random.key(1), lm.config, cfg)
  params = lm.params

  def loss(lp):
    out = lm.module.apply(lora.variables(params, lp, cfg), IDS)
    return -jnp.mean(jax.nn.log_softmax(out.logits)[:, :-1][
        jnp.arange(2)[:, None], jnp.arange(8)[None], IDS[:, 1:]])

  before = jax.tree.map(np.array, params)
  grads = jax.jit(jax.grad(loss))(lp)
  # B is zero, so dL/dA = 0 at init, but dL/dB is not.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if path[-1].key == 'b':
      assert float(jnp.abs(g).max()) > 0, path
  assert jax.tree.structure(grads) == jax.tree.structure(lp)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))


def test_scale_is_alpha_over_rank(gpt2_dir):
  """alpha=8 with B equals alpha=4 with 2B (rank 4): the update is (alpha / rank) x A B."""
  lm = metal_jax.load_lm(gpt2_dir)
  small = lora.LoraConfig(rank=4, alpha=4.0)
  big = lora.LoraConfig(rank=4, alpha=8.0)
  lp = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(0), lm.config, small))
  lp2 = jax.tree_util.tree_map_with_path(lambda p, x: 2 * x if p[-1].key == 'b' else x, lp)
  np.testing.assert_allclose(logits(lm, lp, big), logits(lm, lp2, small), atol=1e-6)
  assert jnp.abs(logits(lm, lp, big) - logits(lm, lp, small)).max() > 1e-3


def test_bad_config():
  with pytest.raises(ValueError, match='unknown'):
    lora.LoraConfig(targets=('query',))
  with pytest.raises(ValueError, match='rank'):
    lora.LoraConfig(rank=0)


def test_target_without_a_kernel_fails_naming_it(gpt2_dir):
  """LoRA shapes come from the module: GPT-2's MLP has no gate, so 'gate' is refused at init
  (a silently absent adapter would train nothing); the shapes found are the kernels' own."""
  lm = metal_jax.load_lm(gpt2_dir)
  with pytest.raises(ValueError, match=r"\['gate'\] match no kernel of this gpt2 model"):
    lora.init(jax.random.key(0), lm.config, lora.LoraConfig(targets=('q', 'gate')))
  shapes = lora.kernel_shapes(lm.config)
  d, n, h, f = lm.config.d_model, lm.config.n_heads, lm.config.head_dim, lm.config.mlp_dim
  assert shapes[('layers_0', 'attn', 'q')]['a'].shape == (d, 1)
  assert shapes[('layers_0', 'attn', 'q')]['b'].shape == (1, n, h)
  assert shapes[('layers_1', 'mlp', 'down')]['a'].shape == (f, 1)
  assert {p[-1] for p in shapes} == {'q', 'k', 'v', 'o', 'up', 'down'}
