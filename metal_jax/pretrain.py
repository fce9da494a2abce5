"""Brief causal-LM pretraining of the built-in tiny GPT-2; no test task's text is ever used.

An LM provider starts MetaL-Prompt from a pretrained LM. The default run has no
pretrained LM to download, so it first trains a tiny GPT-2 in two phases:

1. Induction warm-up (`copy_steps`): every window is a span of distinct random
   vocabulary words repeated to fill it (a random period of 16 to seq_len/2
   tokens), text of no task at all. Predicting the repeats needs a
   previous-token head and an induction head, the circuit pretrained LMs use
   to read in-context examples; the PGM is a copy of this LM, and without that
   circuit it never learns to read X^P (measured in the issue 3/4 notes).
2. Sequences of MetaICL-formatted examples drawn from the META-TRAIN tasks
   (never the test tasks), with the word embeddings (tied head) frozen
   (`freeze_embeddings_after_copy`): the suite's words are i.i.d., and trained
   on them the label words' embeddings collapse onto each other (mean cosine
   0.96), after which no prompt can tell one label from another.

The result is an ordinary HF checkpoint (save_lm) in the workdir, reused by
later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from metal_jax import objective
from metal_jax.data.episodes import concat_examples
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import GPT2Config, GPT2LM
from metal_jax.models.hf import save_lm

log = logging.getLogger('metal_jax')


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  steps: int = 600
  batch_size: int = 32
  seq_len: int = 128
  lr: float = 3e-3
  warmup_steps: int = 50
  # The cosine schedule's horizon; 0 = steps (larger: training stops before the lr reaches 0).
  decay_steps: int = 0
  seed: int = 0
  copy_steps: int = 0  # the first this many steps: induction warm-up windows (see the module doc)
  # Phase 2 leaves the word embeddings (tied head) as they are.
  freeze_embeddings_after_copy: bool = True

  def __post_init__(self):
    if not 0 <= self.copy_steps <= self.steps:
      raise ValueError(f'pretrain.copy_steps={self.copy_steps}: must be in '
                       f'[0, pretrain.steps={self.steps}]')
    if self.decay_steps and self.decay_steps < self.steps:
      raise ValueError(f'pretrain.decay_steps={self.decay_steps}: must be 0 or '
                       f'>= pretrain.steps={self.steps}')
    if self.copy_steps and (self.seq_len + 1) // 2 < 16:
      raise ValueError(f'pretrain.seq_len={self.seq_len}: the induction warm-up needs at '
                       'least 31 tokens')


def lm_batch(tasks: list[TokenizedTask], cfg: PretrainConfig, step: int,
             vocab_size: int) -> np.ndarray:
  """[B, seq_len+1] token windows: each from examples of one task in MetaICL direct format, or
  before step copy_steps a repeated span of distinct random words (ids 3.. vocab_size-1)."""
  out = np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32)
  for i in range(cfg.batch_size):
    rng = np.random.default_rng([cfg.seed, step, i])
    task = tasks[rng.integers(len(tasks))]
    n = min(len(task), 64)
    seq = concat_examples(task, rng.choice(len(task), n, replace=False))
    while len(seq) < cfg.seq_len + 1:  # rare: tasks with very short examples
      seq = np.concatenate([seq, concat_examples(task, rng.choice(len(task), n, replace=False))])
    out[i] = seq[:cfg.seq_len + 1]
    if step < cfg.copy_steps:  # drawn after the task window, from the same stream
      period = int(rng.integers(16, (cfg.seq_len + 1) // 2 + 1))
      span = rng.choice(np.arange(3, vocab_size), period, replace=False)
      out[i] = np.tile(span, cfg.seq_len // period + 2)[:cfg.seq_len + 1]
  return out


def next_token_half(tokens: jax.Array) -> dict:
  """Windows [B, T+1] as an LM half whose targets are all T next tokens (causal-LM loss)."""
  b, t = tokens.shape[0], tokens.shape[1] - 1
  ones = jnp.ones((b, t), jnp.int32)
  return {'lm_ids': tokens[:, :-1], 'lm_mask': ones,
          'target_pos': jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
          'target_ids': tokens[:, 1:], 'target_mask': ones}


def make_step(module, tx, embed_param: str):
  """The jitted LM step (params, opt_state, tokens [B, T+1], embed_on) -> (params, opt_state, loss);
  embed_on=0 leaves the word-embedding table `embed_param` exactly as it is."""

  @jax.jit
  def step(params, opt_state, tokens, embed_on):
    def loss_fn(p):  # every next token of every window is a target
      return objective.mean_nll(module, p, None, next_token_half(tokens))
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    updates = {**updates, embed_param: updates[embed_param] * embed_on}
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def pretrain(model_cfg: GPT2Config, tasks: list[TokenizedTask], tokenizer, cfg: PretrainConfig,
             out_dir: str, progress: bool = True) -> str:
  """Trains (or reuses) the base LM; returns its checkpoint directory."""
  key = hashlib.sha256(json.dumps(
      [dataclasses.asdict(cfg), model_cfg.to_hf(),
       sorted(f'{os.path.basename(t.path)}:{t.fingerprint}' for t in tasks)],
      sort_keys=True).encode()).hexdigest()[:16]
  done = os.path.join(out_dir, 'pretrain.json')
  if os.path.exists(done) and json.load(open(done)).get('key') == key:
    log.info('reusing the pretrained base LM in %s', out_dir)
    return out_dir
  module = GPT2LM(model_cfg)
  params = module.init(jax.random.key(cfg.seed), jnp.zeros((1, 8), jnp.int32))['params']
  params = nn.unbox(params)
  warmup = min(cfg.warmup_steps, cfg.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup,
                                                max(cfg.decay_steps or cfg.steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  step = make_step(module, tx, model_cfg.embed_param)

  t0, loss = time.time(), float('nan')  # steps=0: the randomly initialised LM, saved as is
  curve = []  # [step, loss] every 10 steps and the last: pretrain.json's loss curve
  bar = tqdm(range(cfg.steps), desc='pretrain base LM', dynamic_ncols=True, disable=not progress)
  for s in bar:
    frozen = cfg.freeze_embeddings_after_copy and 0 < cfg.copy_steps <= s
    tokens = lm_batch(tasks, cfg, s, model_cfg.vocab_size)
    params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.float32(not frozen))
    if s % 10 == 0 or s == cfg.steps - 1:
      curve.append([s, float(loss)])
      bar.set_postfix(loss=f'{curve[-1][1]:.3f}')
    if s == cfg.copy_steps - 1:  # about 2.0 once the induction circuit has formed, ln(vocab) before
      log.info('induction warm-up: %d steps, last loss %.3f', cfg.copy_steps, float(loss))
  log.info('pretrained the base LM: %d steps in %.0f s, final loss %.3f', cfg.steps,
           time.time() - t0, float(loss))
  tmp = out_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  save_lm(tmp, model_cfg, params, tokenizer)
  with open(os.path.join(tmp, 'pretrain.json'), 'w') as f:
    json.dump({'key': key, 'steps': cfg.steps, 'final_loss': float(loss), 'losses': curve}, f)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir
