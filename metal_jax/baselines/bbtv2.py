"""BBTv2 (Sun et al. 2022): derivative-free deep prompt tuning with CMA-ES in random subspaces.

BBTv2 optimises a prompt for every layer of the frozen LM, each through a fixed
random projection of a low-dimensional vector: layer l's prompt is A_l z_l with
z_l in R^d (the intrinsic dimension, 500 in BBTv2) and A_l a fixed random
normal matrix. Optimisation is divide-and-conquer: one CMA-ES instance per
layer (the `cma` library, popsize 5 in the paper, sigma0 1.0, z_l starting at
0); the layers are visited in turn, and a visit runs ONE generation of that
layer's CMA-ES: `popsize` candidate vectors, each evaluated with one forward
pass of the frozen LM over the few-shot batch (loss = objective.mean_nll, the
mean NLL of y), the other layers held at their current prompts.

Adaptation to this LM: BBTv2's deep prompt replaces hidden states at every
layer's prompt positions; our LM takes per-layer prompts as prefix keys/values,
so here layer l's prompt is its prefix KV: A_l z_l reshaped to keys and values
[2, P, K, H] (P = prompt_len, 50 in the paper). The projection's scale follows
BBTv2's random projection, std = alpha * std(word embeddings) / (sqrt(d) *
sigma0), for every layer (BBTv2 uses per-layer hidden-state statistics for the
deeper layers; we use the word-embedding std throughout, a simpler documented
scale). A_l is drawn from a PRNG key folded with l inside the jitted projection,
never stored (L full matrices would not fit for GPT2-XL).

The kept prompt is elitist: after each generation, layer l takes the
generation's best candidate if it lowers the best loss so far (BBTv2 keeps its
best solution). So `losses` (the kept prompt's loss after each generation) never
rises and the returned prompt's loss is losses[-1] exactly, with no extra pass.

Budget: `budget` forward passes in all (the paper: 240 per cycle over GPT2-XL's
48 layers x popsize 5, 3,840 in all); generations = budget // popsize, stopping
before a generation would exceed it. With a budget below one generation the
prompt is the untuned zero prefix (z = 0 for every layer) and the note says so.

The `cma` library seeds numpy's global RNG; run() restores the global state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Sequence

import cma
import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import objective
from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import KV
from metal_jax.pgm import Prompt



@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams:
  """BBTv2's: prompt length 50, CMA-ES popsize 5, 3,840 forward passes (the paper's budget)."""
  prompt_len: int = 50
  popsize: int = 5
  budget: int = 3840  # LM forward passes per task
  intrinsic_dim: int = 500
  sigma0: float = 1.0
  alpha: float = 1.0
UNTUNED_NOTE = 'budget allows 0 CMA-ES iterations: prompt is untuned'


def to_prompt(state: jax.Array) -> Prompt:
  """[L, 2, P, K, H] per-layer prefixes -> Prompt(kv=KV([L, 1, P, K, H], [L, 1, P, K, H]))."""
  return Prompt(kv=KV(state[:, 0][:, None], state[:, 1][:, None]))


# Drawing A_l (d x 2PKH normals) can cost more than the population's forward passes on a small
# LM (README: "BBTv2's projections"), so run() draws every layer's A_l once per task when they
# fit in this many bytes in all; bigger models (GPT2-XL: 15 GB) draw A_l at every generation.
CACHE_BYTES = 1 << 30


@functools.partial(jax.jit, static_argnames=('d', 'shape'))
def projection(key: jax.Array, layer, std, d: int, shape: tuple[int, ...]) -> jax.Array:
  """Layer `layer`'s projection A_layer [d, prod(shape)], A ~ N(0, std^2) (from key and layer)."""
  a = jax.random.normal(jax.random.fold_in(key, layer), (d, math.prod(shape)), jnp.float32)
  return a * std


@functools.partial(jax.jit, static_argnames=('shape',))
def project(a: jax.Array, z: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Candidates z [N, d] -> prefixes [N, *shape] = z @ a, `a` a layer's projection."""
  return (z.astype(jnp.float32) @ a).reshape((z.shape[0],) + shape)


def layer_loss(module, params: dict, state: jax.Array, layer, kv_layer: jax.Array,
               batch: dict) -> jax.Array:
  """The loss with layer `layer`'s prefix replaced by kv_layer [2, P, K, H] (one forward pass)."""
  kv = jax.lax.dynamic_update_index_in_dim(state, kv_layer.astype(state.dtype), layer, 0)
  return objective.mean_nll(module, params, to_prompt(kv), batch)


@functools.partial(jax.jit, static_argnames=('module',))
def population_loss(module, params: dict, state: jax.Array, layer, cands: jax.Array,
                    batch: dict) -> jax.Array:
  """Losses [N] of N candidates [N, 2, P, K, H] for one layer: N forward passes in one program,
  batched (vmap: N x B rows a matmul; 1.1-1.35x faster than one candidate at a time, lax.map, on
  the default's tiny LM and 2 CPU cores)."""
  return jax.vmap(lambda kv: layer_loss(module, params, state, layer, kv, batch))(cands)


@functools.partial(jax.jit, static_argnames=('module', 'shape'))
def generation(module, params: dict, state: jax.Array, best, layer, a: jax.Array, z: jax.Array,
               batch: dict, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One CMA-ES generation's device work for layer `layer`: candidates z [N, d] projected by its
  A (a), their losses [N], and the elitist update. Returns (state, best, losses): layer `layer`
  of state [L, 2, P, K, H] becomes the best candidate when its loss is below best (the kept
  prompt's loss), so the kept prompt never leaves the device."""
  cands = project(a, z, shape)
  fits = population_loss(module, params, state, layer, cands, batch)
  i = jnp.argmin(fits)  # the first minimum (a NaN, as numpy's argmin; NaN < best is False)
  better = fits[i] < best
  kept = jax.lax.dynamic_update_index_in_dim(state, cands[i].astype(state.dtype), layer, 0)
  return jnp.where(better, kept, state), jnp.where(better, fits[i], best), fits


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng) -> common.TuneResult:
  cfg = module.config
  p, pop, d = int(hp.prompt_len), int(hp.popsize), int(hp.intrinsic_dim)
  n_layers = cfg.n_layers
  shape = (2, p, cfg.n_kv_heads, cfg.head_dim)
  state = jnp.zeros((n_layers,) + shape, jnp.float32)  # z = 0 everywhere: A z = 0
  generations = int(hp.budget) // pop
  if generations <= 0:
    return common.TuneResult(prompt=to_prompt(state), forward_passes=0, backward_passes=0,
                             losses=[], note=UNTUNED_NOTE)

  key = common.as_key(rng)
  r_proj, r_seed = jax.random.split(key)
  seed = int(common.np_rng(r_seed).integers(1, 2**30))  # cma: seed 0 would mean "random"
  table = np.asarray(params[cfg.embed_param], np.float32)
  std = np.float32(hp.alpha * float(table.std()) / (math.sqrt(d) * hp.sigma0))
  spec = common.short_buckets(spec)
  batch = common.train_batch(task, idx, spec.with_prompt_len(p))
  if n_layers * d * math.prod(shape) * 4 <= CACHE_BYTES:  # every A_l once per task
    layer_projection = [projection(r_proj, l, std, d, shape) for l in range(n_layers)].__getitem__
  else:  # A_l drawn again at every generation
    layer_projection = lambda l: projection(r_proj, l, std, d, shape)

  # The host's CMA-ES and the device alternate: a strategy's tell draws from numpy's global RNG
  # (cma's consistency checks), which every strategy's ask samples from, so the next ask waits
  # for this tell, and overlapping them would change the candidates.
  np_state = np.random.get_state()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # cma warns about small populations / dimensions
      strategies = [cma.CMAEvolutionStrategy(np.zeros(d), float(hp.sigma0),
                                             {'popsize': pop, 'seed': seed + l, 'verbose': -9})
                    for l in range(n_layers)]
      # The kept prompt and its loss stay on the device (generation() updates them); the host
      # reads each generation's losses, which its CMA-ES needs.
      state, best = common.on_params_mesh(params, (state, jnp.float32(jnp.inf)))
      bests = []
      for g in range(generations):
        layer = g % n_layers
        es = strategies[layer]
        zs = es.ask()
        state, best, fits = generation(module, params, state, best, layer, layer_projection(layer),
                                       jnp.asarray(np.stack(zs), jnp.float32), batch, shape)
        es.tell(zs, np.asarray(fits).tolist())
        bests.append(best)
  finally:
    np.random.set_state(np_state)
  return common.TuneResult(prompt=to_prompt(state), forward_passes=generations * pop,
                           backward_passes=0,
                           losses=[float(x) for x in jax.device_get(bests)])
