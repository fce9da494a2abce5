"""What the prompt-tuning baselines share: the few-shot training batch, the loss, the tuning loop.

Every baseline tunes a prompt for ONE task from its few-shot examples (the paper:
16 examples, (n_P, n_L) = (16, 0)) with the LM frozen, and reports its cost in
the paper's budget unit: LM forward (and backward) passes over a batch.

The training batch holds the examples as the LM sees them at test time with no
demonstrations: prompt + x (bare, MetaICL's first-example format) + y, the loss
on y's tokens (objective.score), mean over the batch's y tokens.

Gradient tuning (`tune`) is the paper's baseline recipe: AdamW, learning rate
decaying linearly to 0 over all steps, no warmup, `epochs` passes over the
examples in shuffled minibatches of `batch_size` (16 examples at batch 16: one
step an epoch). One optimizer step counts as 1 forward + 1 backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metal_jax import objective, sharding
from metal_jax.data.episodes import EpisodeSpec, build_lm_half, collate_lm, lm_lengths
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import KV
from metal_jax.pgm import Prompt



@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningHparams:
  """The paper's budget for the gradient-tuned prompts: AdamW with linear decay, 10 epochs of
  batch 16 over the 16 examples, prompt length 20; each method sets its learning rate."""
  lr: float
  epochs: int = 10
  batch_size: int = 16
  prompt_len: int = 20
  weight_decay: float = 0.0


@dataclasses.dataclass
class TuneResult:
  prompt: Prompt | None  # batch-1 prompt for the frozen LM (None: no prompt)
  forward_passes: int  # LM forward passes over a batch spent on this task (the paper's unit)
  backward_passes: int
  losses: list[float]  # the method's own training loss per step / iteration
  note: str = ''  # e.g. 'budget allows 0 CMA-ES iterations: prompt is untuned'


def short_buckets(spec: EpisodeSpec) -> EpisodeSpec:
  """spec, padding short rows to 8 or 16 tokens too (its shortest bucket is 32 by default): a
  tuner scores its few-token rows hundreds of times a task, and right padding leaves the losses
  as they are, for a fraction of the work."""
  return dataclasses.replace(spec, buckets=tuple(sorted({8, 16, *spec.length_buckets()})))


def on_params_mesh(params: dict, tree):
  """tree replicated on the mesh the LM's params are on, as a jitted step returns its state: the
  step's first call then compiles the program the later calls run (arrays on no mesh would make
  it compile a second one)."""
  mesh = getattr(jax.tree.leaves(params)[0].sharding, 'mesh', None)
  return tree if mesh is None else jax.device_put(tree, sharding.replicated(mesh))


def train_batch(task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec) -> dict:
  """The examples idx of `task` as one LM half (prompt + x + y, n_L = 0): jnp arrays, right-padded.

  Keys lm_ids, lm_mask [B, T] and target_pos, target_ids, target_mask [B, Y]
  (episodes.collate_lm); the target is y. Sequences are cut from the left to
  spec.lm_budget = max_len - spec.prompt_len tokens.
  """
  idx = [int(i) for i in idx]
  if not idx:
    raise ValueError('train_batch needs at least one example')
  empty = np.zeros((0,), np.int32)
  halves = [build_lm_half(empty, task.input_first[i], task.input_rest[i], task.output_ids[i], spec)
            for i in idx]
  return {k: jnp.asarray(v) for k, v in collate_lm(halves, *lm_lengths(halves, spec)).items()}


def as_key(rng) -> jax.Array:
  """A jax PRNG key from a key or an int seed."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


def np_rng(key: jax.Array) -> np.random.Generator:
  """A numpy Generator seeded by a jax key (host-side shuffling and sampling: no device ops)."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())


def steps_per_epoch(n: int, batch_size: int) -> int:
  return math.ceil(n / batch_size)


@functools.partial(jax.jit, static_argnums=0)
def init_module(module, rng: jax.Array):
  """module.init(rng)['params'] for a parameter-only Linen module (jitted: one compile per module)."""
  return module.init(rng)['params']


# ----------------------------------------------------------------------------- gradient tuning


def adamw(lr, total_steps, weight_decay: float) -> optax.GradientTransformation:
  """The baselines' optimizer: AdamW (b1 0.9, b2 0.999, eps 1e-8) with the learning rate decaying
  linearly from lr to 0 over total_steps, no warmup, from the optimizer's own step count.

  lr and total_steps may be traced (optax.linear_schedule needs them static), so one compiled
  step serves every learning rate and budget.
  """
  return optax.adamw(lambda count: lr * (1.0 - count / total_steps), b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=('module', 'to_prompt', 'weight_decay'))
def _train_step(module, to_prompt, weight_decay, params, trainable, opt_state, batch, lr,
                total_steps):
  def loss_fn(tr):
    return objective.mean_nll(module, params, to_prompt(tr), batch)

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  tx = adamw(lr, total_steps, weight_decay)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


def tune(init_params: Any, to_prompt: Callable[[Any], Prompt], module, params: dict, batch: dict,
         *, lr: float, epochs: int, batch_size: int, rng, weight_decay: float = 0.0
         ) -> tuple[Any, list[float]]:
  """Gradient prompt tuning; returns (final trainable params, the minibatch loss of every step).

  AdamW (b1 0.9, b2 0.999, eps 1e-8; decoupled weight decay, 0 by default as in
  transformers' Trainer) with the learning rate decaying linearly from `lr` to 0
  over all steps, no warmup. Each epoch shuffles the batch's rows (a numpy
  Generator seeded by `rng`) and takes minibatches of `batch_size` rows (the
  last one smaller when batch_size does not divide them). The loss of a step is the
  minibatch loss before its update. `to_prompt(trainable) -> Prompt` (batch 1)
  is a static jit argument: pass a hashable callable that compares by value
  (a frozen dataclass) so that the step compiles once per shape across tasks.
  """
  shuffle = np_rng(as_key(rng))
  host = {k: np.asarray(v) for k, v in batch.items()}  # minibatches are cut on the host
  n = int(host['lm_ids'].shape[0])
  per_epoch = steps_per_epoch(n, batch_size)
  total = int(epochs) * per_epoch
  trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_params)
  if total == 0:
    return trainable, []
  weight_decay = float(weight_decay)
  opt_state = adamw(lr, total, weight_decay).init(trainable)
  lr_t, total_t = jnp.float32(lr), jnp.float32(total)
  losses = []
  for _ in range(int(epochs)):
    order = shuffle.permutation(n)
    for s in range(per_epoch):
      rows = order[s * batch_size:(s + 1) * batch_size]
      mb = {k: v[rows] for k, v in host.items()}
      trainable, opt_state, loss = _train_step(module, to_prompt, weight_decay, params,
                                               trainable, opt_state, mb, lr_t, total_t)
      losses.append(float(loss))
  return trainable, losses


@functools.partial(jax.jit, static_argnums=0)
def make_prompt(to_prompt, trainable) -> Prompt:
  return to_prompt(trainable)


@dataclasses.dataclass(frozen=True)
class EncoderPrompt:
  """A reparameterised prompt: a parameter-only Linen module's output -> Prompt.

  `kind` 'embeds': the module gives [P, D] input embeddings; 'kv': it gives
  per-layer prefixes [L, 2, P, K, H]. Hashable, so tune() compiles once per shape.
  """
  encoder: Any  # a Linen module with no inputs
  kind: str

  def __call__(self, p) -> Prompt:
    out = self.encoder.apply({'params': p})
    if self.kind == 'embeds':
      return Prompt(embeds=out[None])
    return Prompt(kv=KV(out[:, 0][:, None], out[:, 1][:, None]))


def tune_encoder(to_prompt: EncoderPrompt, module, params: dict, task: TokenizedTask,
                 idx: Sequence[int], spec: EpisodeSpec, hp, rng) -> TuneResult:
  """Initialises the encoder and tunes its weights on the examples idx (P-tuning, Prefix-tuning)."""
  r_init, r_shuffle = jax.random.split(as_key(rng))
  init = init_module(to_prompt.encoder, r_init)
  batch = train_batch(task, idx, spec.with_prompt_len(hp.prompt_len))
  trained, losses = tune(init, to_prompt, module, params, batch, lr=hp.lr, epochs=hp.epochs,
                         batch_size=hp.batch_size, rng=r_shuffle, weight_decay=hp.weight_decay)
  return gradient_result(trained, to_prompt, losses)


def gradient_result(trainable, to_prompt, losses: list[float], note: str = '') -> TuneResult:
  """The result of gradient tuning: one forward + one backward pass per optimizer step."""
  return TuneResult(prompt=make_prompt(to_prompt, trainable), forward_passes=len(losses),
                    backward_passes=len(losses), losses=losses, note=note)
