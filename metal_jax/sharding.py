"""The mesh, the logical axis rules, and shardings for params and batches.

One mesh over ('data', 'fsdp', 'tensor'). The frozen LM is sharded by logical
axis names carried by its params (FSDP over 'embed', tensor parallelism over
heads / MLP / vocab); the trainable pytree is replicated; batches are split over
data x fsdp. A dimension a mesh axis does not divide stays replicated along it
(MQA's single key/value head, an odd vocab), so one rule table serves every model;
param_shardings logs each such dimension with what it costs per device.

Activations are constrained by the same table (`constrain`, names 'activation_*') at block
boundaries and on the generated prompt, inside functions traced `on_mesh`; elsewhere
`constrain` does nothing.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

log = logging.getLogger('metal_jax')

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
    # Activations: rows over data x fsdp (FSDP shards weights, not the width of activations),
    # key/value heads over tensor; length, width and head width whole.
    ('activation_batch', BATCH),
    ('activation_kv_heads', 'tensor'),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_head_dim', None),
    ('activation_layers', None),
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


def _fit(spec: PS, shape: tuple[int, ...], mesh) -> tuple[PS, list[tuple[int, str]]]:
  """Drops mesh axes that do not divide their dimension; also returns [(dim, axis)] dropped."""
  out, dropped = [], []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
      elif mesh.shape[a] > 1:
        dropped.append((i, a))
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PS(*out), dropped


def shard_bytes(shape: tuple[int, ...], dtype, sharding: NamedSharding) -> int:
  """Bytes one device holds of an array of `shape` and `dtype` laid out by `sharding`."""
  return int(np.prod(sharding.shard_shape(shape), dtype=np.int64)) * np.dtype(dtype).itemsize


def logical_shardings(abstract_boxed, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a pytree of (possibly nn.Partitioned-boxed) ShapeDtypeStructs.

  Logs, once per (logical axis, size, mesh axis), every dimension left replicated along a mesh
  axis that does not divide it, with how many arrays and MiB per device that leaves whole.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  unboxed = nn.unbox(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  names = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PS))
  fitted, costs = [], collections.defaultdict(lambda: [0, 0])
  for s, name, x in zip(jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PS)), names,
                        jax.tree.leaves(unboxed)):
    spec, dropped = _fit(s, x.shape, mesh)
    fitted.append(NamedSharding(mesh, spec))
    for dim, axis in dropped:
      cost = costs[(tuple(name)[dim], x.shape[dim], axis)]
      cost[0] += 1
      cost[1] += shard_bytes(x.shape, x.dtype, fitted[-1])
  for (logical, size, axis), (n, nbytes) in sorted(costs.items(), key=lambda kv: -kv[1][1]):
    log.warning('sharding: %s dimension of size %d is not divisible by mesh axis %s=%d, so it '
                'stays replicated along it in %d arrays (%.1f MiB per device)', logical, size,
                axis, mesh.shape[axis], n, nbytes / 2**20)
  return jax.tree.unflatten(jax.tree.structure(unboxed), fitted)


def param_shardings(module: nn.Module, mesh: Mesh, rules=LOGICAL_RULES):
  """Shardings of the module's params from the logical names they are created with."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return logical_shardings(boxed['params'], mesh, rules)


def constrain(x: jax.Array, names: tuple[str | None, ...], rules=LOGICAL_RULES) -> jax.Array:
  """x constrained to the logical axes `names` on the mesh it is traced on (see on_mesh); a
  no-op outside one. Axes that do not divide their dimension are left out, as for params."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  table = dict(rules)
  spec, _ = _fit(PS(*(table.get(n) if n else None for n in names)), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """fn traced with `mesh` as the abstract mesh in context, so that its `constrain` calls apply."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp."""
  return NamedSharding(mesh, PS(BATCH))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (every process passes its own share)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
