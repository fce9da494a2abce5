"""Scoring (query, option) pairs against encoded contexts: the one path eval.py and serve.py share.

A *context* is the keys/values of everything the frozen LM reads before a query: a method's
prompt (prefix keys/values, or embeddings run through the LM) followed by its demonstrations
(ICL's examples, the n_L examples of X^L). It is encoded once per (task, seed, method) with
`encode_context` and every (query, option) row of that task attends to it as a prefix, instead
of re-running the prompt and the demonstrations for every pair.

Rows reproduce `episodes.build_lm_half` exactly: a row whose demonstrations, query and option fit
`spec.lm_budget` reads [context ; x ; y]; one that does not has (X^L + x) cut from the left, as
the recomputing path does, and reads the context of X^L cut at that point (shared by every row
with the same cut: long demonstrations cut by queries of a few dozen distinct lengths make a few
dozen contexts, not one per row). The score is MetaICL's: the mean NLL of the option's tokens.

Batching. Contexts are stacked in a `ContextTable` ([L, N, C, K, H], each entry's length, right
padding masked by `prefix_mask`). A call scores G blocks of R rows; the rows of a block share one
table entry, which `layers.attend` reads once for the block (never copied per row); row b sees
its entry's first `len` slots and its own tokens at positions len, len + 1, ... Every size is
bucketed (rows, query and option lengths, N, C), so a few compilations serve every task. The
server uses R = 1 (any mix of prompts in a batch) with a persistent table of slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import objective
from metal_jax.data.episodes import EpisodeSpec, LMHalf, bucket, collate_lm
from metal_jax.models.base import CausalLM
from metal_jax.models.layers import KV
from metal_jax.pgm import Prompt
from metal_jax.serving.generate import bucket as pow2  # the power-of-two sizes decoding uses



# ----------------------------------------------------------------------------- contexts


@dataclasses.dataclass
class Context:
  """Keys/values [L, 1, length, K, H] (compute dtype, on device), or None when empty."""
  kv: KV | None
  length: int

  @property
  def nbytes(self) -> int:
    return 0 if self.kv is None else 2 * self.kv.k.size * self.kv.k.dtype.itemsize


@functools.partial(jax.jit, static_argnames=('module',))
def _encode(module: CausalLM, params: dict, prefix: KV | None, embeds: jax.Array | None,
            ids: jax.Array, n: jax.Array) -> KV:
  """Keys/values of [embeds ; ids[:n]] (ids right padded) after a prefix of P slots."""
  dtype = module.config.jnp_dtype
  b, t = ids.shape
  p = 0 if prefix is None else prefix.k.shape[2]
  e = 0 if embeds is None else embeds.shape[1]
  real = jnp.arange(e + t)[None] < e + n  # [1, E + T]
  # Padding gets position 0: within GPT-2's position table whatever the bucket.
  positions = jnp.where(real, p + jnp.arange(e + t)[None], 0)
  if embeds is not None:
    full_ids = jnp.concatenate([jnp.zeros((b, e), ids.dtype), ids], axis=1)
    full_embeds = jnp.concatenate(
        [embeds.astype(dtype), jnp.zeros((b, t, embeds.shape[2]), dtype)], axis=1)
    sel = jnp.broadcast_to(jnp.arange(e + t) < e, (b, e + t))
    out = module.apply({'params': params}, full_ids, real.astype(jnp.int32),
                       input_embeds=full_embeds, embeds_mask=sel, positions=positions,
                       return_kv=True, return_logits=False)
  else:
    out = module.apply({'params': params}, ids, real.astype(jnp.int32), prefix,
                       positions=positions, return_kv=True, return_logits=False)
  k, v = out.kv.k, out.kv.v
  if prefix is not None:
    k = jnp.concatenate([prefix.k.astype(k.dtype), k], axis=2)
    v = jnp.concatenate([prefix.v.astype(v.dtype), v], axis=2)
  return KV(k, v)


def encode_context(module: CausalLM, params: dict, prompt: Prompt | None,
                   tokens: np.ndarray) -> Context:
  """The context [prompt ; tokens] (a batch-1 prompt or None; tokens the demonstrations)."""
  if prompt is not None and prompt.batch_size != 1:
    raise ValueError(f'a context\'s prompt has batch 1, got {prompt.batch_size}')
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  n = len(tokens)
  if prompt is not None and prompt.kv is not None and n == 0:
    dtype = module.config.jnp_dtype
    return Context(KV(jnp.asarray(prompt.kv.k, dtype), jnp.asarray(prompt.kv.v, dtype)),
                   prompt.length)
  p = 0 if prompt is None else prompt.length
  if p + n == 0:
    return Context(None, 0)
  ids = np.zeros((1, pow2(n) if n else 0), np.int32)
  ids[0, :n] = tokens
  kv = _encode(module, params, None if prompt is None else prompt.kv,
               None if prompt is None else prompt.embeds, jnp.asarray(ids), jnp.int32(n))
  return Context(KV(kv.k[:, :, :p + n], kv.v[:, :, :p + n]), p + n)


@dataclasses.dataclass
class ContextTable:
  """Contexts stacked on a leading entry axis: k, v [L, N, C, K, H], length [N] (int32)."""
  kv: KV | None
  length: jax.Array

  @classmethod
  def stack(cls, contexts: Sequence[Context], config) -> 'ContextTable':
    """N and C bucketed to powers of two; None when every context is empty."""
    c = max(x.length for x in contexts)
    lengths = np.zeros((pow2(len(contexts), 1),), np.int32)
    lengths[:len(contexts)] = [x.length for x in contexts]
    if c == 0:
      return cls(None, jnp.asarray(lengths))
    c = pow2(c)
    empty = jnp.zeros((config.n_layers, c, config.n_kv_heads, config.head_dim), config.jnp_dtype)

    def column(x: Context, field: str) -> jax.Array:  # [L, C, K, H]
      if not x.length:
        return empty
      a = getattr(x.kv, field)[:, 0].astype(config.jnp_dtype)
      return jnp.pad(a, ((0, 0), (0, c - x.length), (0, 0), (0, 0)))

    pad = [empty] * (len(lengths) - len(contexts))
    k = jnp.stack([column(x, 'k') for x in contexts] + pad, axis=1)
    v = jnp.stack([column(x, 'v') for x in contexts] + pad, axis=1)
    return cls(KV(k, v), jnp.asarray(lengths))


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
  """One (query, option): the table entry it reads, its query tokens and the option's."""
  entry: int
  query: np.ndarray
  target: np.ndarray


@functools.partial(jax.jit, static_argnames=('module', 'rows_per_block'))
def _score_blocks(module: CausalLM, params: dict, table: KV | None, table_len: jax.Array,
                  block_entry: jax.Array, batch: dict, *, rows_per_block: int) -> jax.Array:
  """Mean option NLL [G * R] of rows whose block g reads table entry block_entry[g]."""
  if table is None:
    prompt, kw = None, {}
  else:
    entry_len = jnp.repeat(table_len[block_entry], rows_per_block)  # [B]
    c = table.k.shape[2]
    t = batch['lm_ids'].shape[1]
    prompt = Prompt(kv=KV(jnp.take(table.k, block_entry, axis=1),
                          jnp.take(table.v, block_entry, axis=1)))  # [L, G, C, K, H]
    kw = {'prefix_mask': jnp.arange(c)[None] < entry_len[:, None],
          'positions': jnp.where(batch['lm_mask'] > 0, entry_len[:, None] + jnp.arange(t)[None],
                                 0)}
  total, count = objective.score(module, params, prompt, batch, **kw)
  return total / jnp.maximum(count, 1.0)


def score_rows(module: CausalLM, params: dict, table: ContextTable, rows: Sequence[Row],
               spec: EpisodeSpec, *, rows_per_block: int = 8, blocks_per_call: int = 4
               ) -> np.ndarray:
  """Mean option NLL of every row ([len(rows)] float32), in calls of G blocks of R rows."""
  r, g = rows_per_block, blocks_per_call
  blocks: list[list[int]] = []  # row indices; one table entry per block
  order = sorted(range(len(rows)), key=lambda i: rows[i].entry)
  for i in order:
    if blocks and len(blocks[-1]) < r and rows[blocks[-1][0]].entry == rows[i].entry:
      blocks[-1].append(i)
    else:
      blocks.append([i])
  # Calls of blocks with similar lengths share a query bucket.
  blocks.sort(key=lambda bl: max(len(rows[i].query) + len(rows[i].target) for i in bl))
  out = np.zeros((len(rows),), np.float32)
  lm_buckets = spec.length_buckets()
  for start in range(0, len(blocks), g):
    call = blocks[start:start + g]
    halves, entries = [], []
    for bl in call + [[]] * (g - len(call)):  # a fixed block count: one compilation
      members = [rows[i] for i in bl]
      entries.append(members[0].entry if members else 0)
      halves += [LMHalf(x.query, x.target) for x in members]
      halves += [LMHalf(np.zeros((0,), np.int32), np.zeros((0,), np.int32))] * (r - len(bl))
    real = [h for h in halves if len(h.target)]
    lm_len = bucket(max(len(h.context) + len(h.target) for h in real), lm_buckets)
    tgt_len = bucket(max(len(h.target) for h in real), spec.target_buckets + (spec.lm_budget,))
    batch = {k: jnp.asarray(v) for k, v in collate_lm(halves, lm_len, tgt_len).items()}
    got = np.asarray(_score_blocks(module, params, table.kv, table.length,
                                   jnp.asarray(entries, jnp.int32), batch, rows_per_block=r))
    for j, bl in enumerate(call):
      out[bl] = got[j * r:j * r + len(bl)]
  return out


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Job:
  """One task's scoring under one method: a prompt (batch 1, or None), the demonstrations'
  tokens (X^L concatenated, may be empty), and queries: (x_first, x_rest, options) each."""
  prompt: Prompt | None
  demos: np.ndarray
  queries: Sequence[tuple[np.ndarray, np.ndarray, Sequence[np.ndarray]]]
  spec: EpisodeSpec

  def context_tokens(self, start: int) -> np.ndarray:
    """The tokens after the prompt of a row whose X^L is cut at `start`: BOS (if any) and
    X^L[start:]."""
    return np.concatenate([self.spec.bos, np.asarray(self.demos[start:], np.int32)])


def job_rows(job: Job) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """Per (query, option): (start, query tokens, option tokens). The row reads the context
  [prompt ; BOS ; X^L[start:]] (`Job.context_tokens`; no BOS for a tokenizer that adds none)
  then its query and option: start 0 when everything fits the budget;
  otherwise build_lm_half's left cut of (X^L + x) lands in X^L at `start` (rows with the same
  cut share that context) or, past X^L (start = len(X^L)), in x itself, which is then cut."""
  out = []
  n_demo, n_bos = len(job.demos), len(job.spec.bos)
  for x_first, x_rest, options in job.queries:
    x = np.asarray(x_rest if n_demo else x_first, np.int32)
    for y in options:
      cut = max(0, n_bos + n_demo + len(x) + len(y) - job.spec.lm_budget)
      out.append((min(cut, n_demo), x[max(0, cut - n_demo):], np.asarray(y, np.int32)))
  return out


def score_jobs(module: CausalLM, params: dict, jobs: Sequence[Job], *, rows_per_block: int = 8,
               blocks_per_call: int = 4, window_bytes: int = 1 << 30) -> list[list[np.ndarray]]:
  """Mean option NLL for every (query, option) of every job: per job, per query, [n_options].

  Each distinct context (a job's prompt and X^L, or X^L cut at some start) is encoded once.
  Contexts are taken in windows (by spec, then length) whose keys/values fit `window_bytes`;
  a window's rows, of whatever job, fill the same calls."""
  cfg = module.config
  token_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize
  specs = list(dict.fromkeys(j.spec for j in jobs))
  results = [[np.zeros((len(opts),), np.float32) for _, _, opts in j.queries] for j in jobs]
  groups: dict[tuple[int, int], list[tuple[int, int, int, np.ndarray, np.ndarray]]] = {}
  for j, job in enumerate(jobs):
    pairs = iter(job_rows(job))
    for q, (_, _, options) in enumerate(job.queries):
      for o in range(len(options)):
        start, query, y = next(pairs)
        groups.setdefault((j, start), []).append((j, q, o, query, y))

  def length(key):
    j, start = key
    p = 0 if jobs[j].prompt is None else jobs[j].prompt.length
    return p + len(jobs[j].context_tokens(start))

  keys = sorted(groups, key=lambda k: (specs.index(jobs[k[0]].spec), length(k)))
  while keys:
    window = [keys.pop(0)]
    spec = jobs[window[0][0]].spec
    while (keys and jobs[keys[0][0]].spec == spec
           and (len(window) + 1) * length(keys[0]) * token_bytes <= window_bytes):
      window.append(keys.pop(0))
    contexts, rows, where = [], [], []
    for e, (j, start) in enumerate(window):
      contexts.append(encode_context(module, params, jobs[j].prompt, jobs[j].context_tokens(start)))
      for jj, q, o, query, y in groups[(j, start)]:
        rows.append(Row(e, query, y))
        where.append((jj, q, o))
    table = ContextTable.stack(contexts, cfg)
    scores = score_rows(module, params, table, rows, spec, rows_per_block=rows_per_block,
                        blocks_per_call=blocks_per_call)
    for (j, q, o), s in zip(where, scores):
      results[j][q][o] = s
  return results


def recompute_scores(module: CausalLM, params: dict, job: Job, rows: int = 32
                     ) -> list[np.ndarray]:
  """The reference: every pair's full LM half (prompt, X^L, x, y as build_lm_half lays it out)
  run from scratch, `rows` pairs a call. What score_jobs must equal, and the speed it beats."""
  from metal_jax.data.episodes import build_lm_half, lm_lengths
  halves, where = [], []
  for q, (x_first, x_rest, options) in enumerate(job.queries):
    for o, y in enumerate(options):
      halves.append(build_lm_half(np.asarray(job.demos, np.int32), x_first, x_rest, y, job.spec))
      where.append((q, o))
  out = [np.zeros((len(opts),), np.float32) for _, _, opts in job.queries]
  if not halves:
    return out
  lm_len, tgt_len = lm_lengths(halves, job.spec)
  scores = np.zeros((len(halves),), np.float32)
  for start in range(0, len(halves), rows):
    chunk = halves[start:start + rows]
    padded = chunk + [chunk[-1]] * (rows - len(chunk))
    batch = {k: jnp.asarray(v) for k, v in collate_lm(padded, lm_len, tgt_len).items()}
    scores[start:start + len(chunk)] = np.asarray(
        _recompute(module, params, job.prompt, batch))[:len(chunk)]
  for (q, o), s in zip(where, scores):
    out[q][o] = s
  return out


@functools.partial(jax.jit, static_argnums=(0,))
def _recompute(module, params, prompt, batch):
  total, count = objective.score(module, params, prompt, batch)
  return total / jnp.maximum(count, 1.0)
