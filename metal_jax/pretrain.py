"""Brief causal-LM pretraining of the built-in tiny GPT-2, on meta-train tasks' text only.

An LM provider starts MetaL-Prompt from a pretrained LM. The default run has no
pretrained LM to download, so it first trains a tiny GPT-2 for a few hundred
steps on sequences of MetaICL-formatted examples drawn from the META-TRAIN
tasks (never the test tasks), the text an LM would have seen. The result is an
ordinary HF checkpoint (save_lm) in the workdir, reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from metal_jax.data.episodes import concat_examples
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import GPT2Config, GPT2LM
from metal_jax.models.hf import load_lm, save_lm

log = logging.getLogger('metal_jax')


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  steps: int = 600
  batch_size: int = 32
  seq_len: int = 128
  lr: float = 3e-3
  warmup_steps: int = 50
  seed: int = 0


def lm_batch(tasks: list[TokenizedTask], cfg: PretrainConfig, step: int) -> np.ndarray:
  """[B, seq_len+1] token windows, each from examples of one task in MetaICL direct format."""
  out = np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32)
  for i in range(cfg.batch_size):
    rng = np.random.default_rng([cfg.seed, step, i])
    task = tasks[rng.integers(len(tasks))]
    n = min(len(task), 64)
    seq = concat_examples(task, rng.choice(len(task), n, replace=False))
    while len(seq) < cfg.seq_len + 1:  # rare: tasks with very short examples
      seq = np.concatenate([seq, concat_examples(task, rng.choice(len(task), n, replace=False))])
    out[i] = seq[:cfg.seq_len + 1]
  return out


def pretrain(model_cfg: GPT2Config, tasks: list[TokenizedTask], tokenizer, cfg: PretrainConfig,
             out_dir: str) -> str:
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
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  warmup = min(cfg.warmup_steps, cfg.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss_fn(p):
      logits = module.apply({'params': p}, tokens[:, :-1]).logits
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0, loss = time.time(), float('nan')  # steps=0: the randomly initialised LM, saved as is
  bar = tqdm(range(cfg.steps), desc='pretrain base LM', dynamic_ncols=True)
  for s in bar:
    params, opt_state, loss = step(params, opt_state, jnp.asarray(lm_batch(tasks, cfg, s)))
    if s % 20 == 0 or s == cfg.steps - 1:
      bar.set_postfix(loss=f'{float(loss):.3f}')
  log.info('pretrained the base LM: %d steps in %.0f s, final loss %.3f', cfg.steps,
           time.time() - t0, float(loss))
  tmp = out_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  save_lm(tmp, model_cfg, params, tokenizer)
  with open(os.path.join(tmp, 'pretrain.json'), 'w') as f:
    json.dump({'key': key, 'steps': cfg.steps, 'final_loss': float(loss)}, f)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir


__all__ = ['PretrainConfig', 'pretrain', 'lm_batch', 'load_lm']
