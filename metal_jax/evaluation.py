"""Option scoring and metrics, MetaICL-style.

Every test example is scored once per option: the mean per-token negative
log-likelihood of the option's tokens under the frozen LM given prompt + X^L + x;
the prediction is the option with the lowest score. Batched over (example,
option) pairs, padded to bucket shapes so jit compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import objective, pgm
from metal_jax.data.episodes import (EpisodeSpec, batch_shapes, build_episode, collate,
                                     concat_examples)
from metal_jax.data.tasks import TokenizedTask

# ----------------------------------------------------------------------------- metrics


def metaicl_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
  """MetaICL's macro-F1: the mean over GOLD classes only; a class never predicted has precision 1.0."""
  recalls, precisions = defaultdict(list), defaultdict(list)
  for p, g in zip(predictions, golds):
    p, g = p.strip(), g.strip()
    recalls[g].append(p == g)
    precisions[p].append(p == g)
  f1s = []
  for c in recalls:
    precision = float(np.mean(precisions[c])) if c in precisions else 1.0
    recall = float(np.mean(recalls[c]))
    f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  return float(np.mean(f1s))


def sklearn_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
  """scikit-learn's macro-F1 over the union of gold and predicted labels (0 for a never-predicted class)."""
  from sklearn.metrics import f1_score
  return float(f1_score(golds, predictions, average='macro', zero_division=0))


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
  return float(np.mean([p.strip() == g.strip() for p, g in zip(predictions, golds)]))


def metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict:
  """In percent, as the paper reports them."""
  return {'metaicl_f1': 100 * metaicl_f1(predictions, golds),
          'sklearn_f1': 100 * sklearn_f1(predictions, golds),
          'accuracy': 100 * accuracy(predictions, golds)}


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnums=(0,))
def _row_scores(module, params, prompt, batch):
  out = pgm.apply_with_prompt(module, params, prompt, batch['lm_ids'], batch['lm_mask'],
                              logit_positions=batch['target_pos'])
  nll = objective.token_nll(out.logits, batch['target_ids'], batch['target_mask'])
  return nll.sum(-1) / jnp.maximum(batch['target_mask'].sum(-1), 1)


def score_options(module, params, prompt: pgm.Prompt | None, demos: TokenizedTask,
                  demo_idx: Sequence[int], queries: TokenizedTask, spec: EpisodeSpec,
                  rows: int = 32) -> list[np.ndarray]:
  """Mean option-token NLL for every (query, option): a list (per query) of [n_options] arrays.

  `prompt` has batch 1 (one prompt per task and seed) and is tiled to the rows;
  `demo_idx` picks X^L from `demos`.
  """
  demo_tokens = concat_examples(demos, demo_idx)
  pairs, episodes = [], []
  for q in range(len(queries)):
    for o, opt in enumerate(queries.option_ids[q]):
      pairs.append((q, o))
      episodes.append(build_episode(np.zeros((0,), np.int32), demo_tokens,
                                    queries.input_first[q], queries.input_rest[q], opt, spec))
  _, lm_len, tgt_len = batch_shapes(episodes, spec)  # one shape for the whole task
  tiled = None if prompt is None else prompt.repeat(rows)
  scores = np.zeros(len(episodes), np.float32)
  for start in range(0, len(episodes), rows):
    chunk = episodes[start:start + rows]
    padded = chunk + [chunk[-1]] * (rows - len(chunk))  # fixed row count: one compile
    batch = collate(padded, spec, 0, lm_len, tgt_len)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith('pgm')}
    scores[start:start + len(chunk)] = np.asarray(
        _row_scores(module, params, tiled, batch))[:len(chunk)]
  out = [np.zeros(len(queries.option_ids[q]), np.float32) for q in range(len(queries))]
  for (q, o), s in zip(pairs, scores):
    out[q][o] = s
  return out


def predict(scores: list[np.ndarray], queries: TokenizedTask) -> list[str]:
  return [queries.raw['options'][q][int(np.argmin(s))] for q, s in enumerate(scores)]


def prompt_for(cfg: pgm.PGMConfig, module, params, trainable, demos: TokenizedTask,
               prompt_idx: Sequence[int], spec: EpisodeSpec) -> pgm.Prompt:
  """One PGM forward pass over X^P (the examples prompt_idx of `demos`) -> a batch-1 prompt."""
  ep = build_episode(concat_examples(demos, prompt_idx), np.zeros((0,), np.int32),
                     demos.input_first[0], demos.input_rest[0], demos.output_ids[0], spec)
  pgm_len, _, _ = batch_shapes([ep], spec)
  b = collate([ep], spec, pgm_len, 0, 0)
  return _generate(cfg, module, params, trainable, jnp.asarray(b['pgm_ids']),
                   jnp.asarray(b['pgm_mask']))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(cfg, module, params, trainable, ids, mask):
  return pgm.generate(cfg, module, params, trainable, ids, mask, train=False)


__all__ = ['metaicl_f1', 'sklearn_f1', 'accuracy', 'metrics', 'score_options', 'predict',
           'prompt_for', 'dataclasses']
