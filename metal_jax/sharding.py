"""The mesh, the logical axis rules, and shardings for params and batches.

One mesh over ('data', 'fsdp', 'tensor'). The frozen LM is sharded by logical
axis names carried by its params (FSDP over 'embed', tensor parallelism over
heads / MLP / vocab); the trainable pytree is replicated; batches are split over
data x fsdp. A dimension a mesh axis does not divide stays replicated along it
(MQA's single key/value head, an odd vocab), so one rule table serves every model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')

# Logical axis -> mesh axis (or None: replicated). Ordered; first match wins.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('qkv', None),
    ('norm', None),
    ('layers', None),
)


def make_mesh(shape: dict | Any, devices=None) -> Mesh:
  """A mesh of shape {'data': d, 'fsdp': f, 'tensor': t}; one entry may be -1 ("the rest")."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(shape[a]) for a in MESH_AXES]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  if -1 in sizes:
    rest = n // int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = rest
  if int(np.prod(sizes)) != n:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; '
                     f'{n} are available')
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit(spec: PS, shape: tuple[int, ...], mesh: Mesh) -> PS:
  """Drops mesh axes that do not divide their dimension."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PS(*out)


def logical_shardings(abstract_boxed, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a pytree of (possibly nn.Partitioned-boxed) ShapeDtypeStructs."""
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_boxed))
  mesh_specs = nn.logical_to_mesh(specs, rules)
  return jax.tree.map(lambda s, shp: NamedSharding(mesh, _fit(s, shp, mesh)), mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PS))


def param_shardings(module: nn.Module, mesh: Mesh, rules=LOGICAL_RULES):
  """Shardings of the module's params from the logical names they are created with."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return logical_shardings(boxed['params'], mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp."""
  return NamedSharding(mesh, PS(BATCH))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (every process passes its own share)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
