"""serving.scoring, the one scoring path of eval.py and serve.py: encoded contexts reused by every
(query, option) of a task, rows of many tasks in one call, each row exactly what recomputing its
full LM half alone gives (prompt + X^L + x + y, build_lm_half's layout and truncation).

Tiny random GPT-2 and Llama (GQA) checkpoints; prompts of both kinds (keys/values, embeddings)
and none; demonstrations of several lengths; a model short enough that some rows must cut
their demonstrations from the left.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from metal_jax.data.episodes import EpisodeSpec, build_lm_half
from metal_jax.models import KV
from metal_jax.models.hf import load_lm
from metal_jax.pgm import Prompt
from metal_jax.serving import scoring

TOL = 1e-5
P = 4


@pytest.fixture(scope='module', params=['gpt2', 'llama'])
def lm(request, gpt2_dir, llama_dir):
  return load_lm(str(gpt2_dir if request.param == 'gpt2' else llama_dir))


def make_prompt(kind, lm, seed):
  if kind is None:
    return None
  rng = np.random.default_rng(seed)
  c = lm.config
  if kind == 'kv':
    shape = (c.n_layers, 1, P, c.n_kv_heads, c.head_dim)
    return Prompt(kv=KV(*(np.asarray(rng.normal(size=shape), np.float32) for _ in range(2))))
  return Prompt(embeds=np.asarray(0.5 * rng.normal(size=(1, P, c.d_model)), np.float32))


def make_job(lm, kind, n_demo, n_queries, seed, spec):
  rng = np.random.default_rng(100 + seed)
  toks = lambda n: rng.integers(1, lm.config.vocab_size, size=n).astype(np.int32)
  queries = []
  for _ in range(n_queries):
    n_opt = int(rng.integers(1, 4))
    queries.append((toks(int(rng.integers(1, 6))), toks(int(rng.integers(1, 6))),
                    [toks(int(rng.integers(1, 4))) for _ in range(n_opt)]))
  return scoring.Job(make_prompt(kind, lm, seed), toks(n_demo), queries, spec)


def assert_close(got, want):
  assert [s.shape for s in got] == [s.shape for s in want]
  worst = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
  assert worst <= TOL, worst


# Spec: 64 positions (the tiny models' limit), so a 40-token X^L with a long query must be cut.
SPEC = EpisodeSpec(prompt_len=P, max_len=64, buckets=(16, 32))
CASES = [('kv', 0), ('kv', 9), ('embeds', 0), ('embeds', 7), (None, 0), (None, 12),
         ('kv', 54), (None, 57)]  # the last two: every row or some rows cut X^L
BOS_SPEC = dataclasses.replace(SPEC, bos_id=1)  # a tokenizer that adds BOS (Llama's)


@pytest.mark.parametrize('spec', [SPEC, BOS_SPEC], ids=['no_bos', 'bos'])
def test_each_job_equals_recomputing_every_pair(lm, spec):
  """Context reuse changes nothing: per task, encoded once, = every pair's full LM half (with
  BOS first when the tokenizer adds one)."""
  for i, (kind, n_demo) in enumerate(CASES):
    job = make_job(lm, kind, n_demo, 5, i, spec)
    assert_close(scoring.score_jobs(lm.module, lm.params, [job])[0],
                 scoring.recompute_scores(lm.module, lm.params, job, rows=8))


@pytest.mark.parametrize('rows_per_block,blocks_per_call', [(4, 3), (1, 8)])
def test_a_mixed_batch_equals_each_job_alone(lm, rows_per_block, blocks_per_call):
  """Rows of eight tasks (different prompts, designs, demonstrations, cuts) filling the same
  calls, as eval.py (R = 4) and the server (R = 1: any prompt per row) run them, give each row
  what scoring its task alone does; a tiny window (one task at a time) too."""
  jobs = [make_job(lm, kind, n_demo, 4, i, SPEC) for i, (kind, n_demo) in enumerate(CASES)]
  alone = [scoring.score_jobs(lm.module, lm.params, [j], rows_per_block=2, blocks_per_call=1)[0]
           for j in jobs]
  mixed = scoring.score_jobs(lm.module, lm.params, jobs, rows_per_block=rows_per_block,
                             blocks_per_call=blocks_per_call)
  windowed = scoring.score_jobs(lm.module, lm.params, jobs, rows_per_block=rows_per_block,
                                blocks_per_call=blocks_per_call, window_bytes=1)
  for got, want, again in zip(mixed, alone, windowed):
    assert_close(got, want)
    assert_close(again, want)


def test_not_vacuous_prompts_and_demos_reach_the_rows(lm):
  base = make_job(lm, None, 0, 4, 0, SPEC)
  got = [scoring.score_jobs(lm.module, lm.params, [scoring.Job(p, d, base.queries, SPEC)])[0]
         for p, d in [(None, base.demos), (make_prompt('kv', lm, 1), base.demos),
                      (None, np.asarray([5, 6, 7], np.int32))]]
  for a, b in [(got[0], got[1]), (got[0], got[2])]:
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) > 1e-3


@pytest.mark.parametrize('spec', [SPEC, BOS_SPEC], ids=['no_bos', 'bos'])
def test_rows_cut_like_build_lm_half(lm, spec):
  """With X^L of 54 tokens in a 60-position budget, a row's context (BOS,) X^L[start:] and query
  are, together, build_lm_half's left-cut (X^L + x): start 0 when it all fits; rows with the same
  cut share one context; a cut past X^L cuts x itself; BOS is never cut."""
  job = make_job(lm, 'kv', 54, 8, 3, spec)
  job.queries.append((np.arange(1, 70, dtype=np.int32),) * 2 + ([np.asarray([3], np.int32)],))
  rows = scoring.job_rows(job)
  pairs = [(xf, xr, y) for xf, xr, opts in job.queries for y in opts]
  assert len(rows) == len(pairs)
  for (start, query, y), (xf, xr, y_want) in zip(rows, pairs):
    want = build_lm_half(job.demos, xf, xr, y_want, spec)
    np.testing.assert_array_equal(y, want.target)
    np.testing.assert_array_equal(np.concatenate([job.context_tokens(start), query]), want.context)
    assert list(want.context[:len(spec.bos)]) == list(spec.bos)
    assert (start == 0) == (len(spec.bos) + len(job.demos) + len(xr) + len(y) <= spec.lm_budget)
  starts = [start for start, _, _ in rows]
  assert 0 in starts and len(job.demos) in starts and len(set(starts)) > 2
  assert len(set(starts)) < len(rows)  # shared cuts


def test_batch_of_g_contexts_is_not_copied_per_row(lm):
  """The encoded context is shared by a block's rows: the call's prefix has G rows, not G * R
  (layers.attend's shared path), visible in the lowered program's shapes."""
  job = make_job(lm, 'kv', 9, 6, 0, SPEC)
  ctx = scoring.encode_context(lm.module, lm.params, job.prompt, job.demos)
  table = scoring.ContextTable.stack([ctx], lm.config)
  c = lm.config
  assert table.kv.k.shape == (c.n_layers, 1, 16, c.n_kv_heads, c.head_dim)
  assert int(table.length[0]) == P + 9
  batch = {k: jax.numpy.zeros((8, 16), np.int32) for k in ('lm_ids', 'lm_mask')}
  batch.update({k: jax.numpy.zeros((8, 4), np.int32)
                for k in ('target_pos', 'target_ids', 'target_mask')})
  text = scoring._score_blocks.lower(lm.module, lm.params, table.kv, table.length,
                                     jax.numpy.zeros((2,), np.int32), batch,
                                     rows_per_block=4).as_text()
  g_shape = f'{c.n_layers}x2x16x{c.n_kv_heads}x{c.head_dim}'
  b_shape = f'{c.n_layers}x8x16x{c.n_kv_heads}x{c.head_dim}'
  assert g_shape in text and b_shape not in text
