"""sharding.py on 8 fake CPU devices (conftest): the mesh, the logical axis rules and batches.

* make_mesh fills one -1 axis with the rest of the devices and refuses impossible shapes by name;
* the frozen LM's params are sharded by their logical names (vocab/heads/mlp over 'tensor',
  embed over 'fsdp'), and a dimension a mesh axis does not divide stays replicated along it
  (Llama's 2 key/value heads over tensor = 4), so every shard is whole;
* a batch is split by rows over data x fsdp and reassembles to the host rows.
(Sharded training equals single-device training: tests/test_training.py, section 5.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from metal_jax import sharding
from metal_jax.models.hf import load_lm


def test_make_mesh_fills_the_rest_and_refuses_bad_shapes():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh({'data': -1, 'fsdp': 2, 'tensor': 1}).shape) == {
      'data': 4, 'fsdp': 2, 'tensor': 1}
  assert dict(sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': -1}).shape)['tensor'] == 8
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1, 'tensor': 1})
  with pytest.raises(ValueError, match='needs 6 devices; 8 are available'):
    sharding.make_mesh({'data': 3, 'fsdp': 2, 'tensor': 1})


def test_llama_params_follow_the_rules_and_undivisible_dims_stay_replicated(llama_dir):
  lm = load_lm(str(llama_dir))  # GQA: 4 query heads, 2 key/value heads, vocab 100, d 32
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})
  sh = sharding.param_shardings(lm.module, mesh)
  layer = sh['layers_0']
  assert sh['embed_tokens'].spec == PS('tensor', 'fsdp')  # [V, D]
  assert layer['attn']['q_proj']['kernel'].spec == PS('fsdp', 'tensor', None)  # [D, N, H]
  assert layer['attn']['k_proj']['kernel'].spec == PS('fsdp', None, None)  # K = 2 < tensor 4
  assert layer['mlp']['down_proj']['kernel'].spec == PS('tensor', 'fsdp')
  assert layer['input_layernorm']['scale'].spec == PS(None)
  shapes = jax.tree.map(lambda x: x.shape, lm.params)
  for s, shape in zip(jax.tree.leaves(sh), jax.tree.leaves(shapes, is_leaf=lambda x:
                                                           isinstance(x, tuple))):
    for dim, axes in zip(shape, s.spec):
      names = () if axes is None else (axes,) if isinstance(axes, str) else axes
      assert dim % int(np.prod([mesh.shape[a] for a in names])) == 0, (shape, s.spec)


def test_fit_keeps_only_dividing_axes():
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  assert sharding._fit(PS(sharding.BATCH), (8,), mesh) == PS(('data', 'fsdp'))
  assert sharding._fit(PS(sharding.BATCH), (6,), mesh) == PS('fsdp')
  assert sharding._fit(PS(sharding.BATCH, 'tensor'), (3, 5), mesh) == PS(None, 'tensor')


def test_global_batch_splits_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  local = {'ids': np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  g = sharding.global_batch(local, mesh)['ids']
  np.testing.assert_array_equal(np.asarray(g), local['ids'])
  assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
  rows = sorted(int(np.asarray(s.data)[0, 0]) // 3 for s in g.addressable_shards)
  assert rows == list(range(0, 16, 2))  # every device holds a different pair of rows
