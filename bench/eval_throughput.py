"""Option-scoring throughput, (query, option) pairs per second: zero-shot, ICL and MetaL on six
tasks shaped like SST-2, AG News, TREC, CB, RTE and DBpedia, before and after context reuse.

  python bench/eval_throughput.py                      # 100 test examples a task, 3 rounds
  python bench/eval_throughput.py --queries=500 --rounds=1

"before" is what evaluation.score_options did until issue 16: every (query, option) pair's whole
LM half (prompt + 16 demonstrations + x + y) run from scratch, 32 pairs a call
(scoring.recompute_scores). "after" is eval.py's path now (scoring.score_jobs): each task's prompt
and demonstrations encoded once as a context of keys/values, the rows of all six tasks filling
shared calls. Both give the same scores (checked here, and by tests/test_scoring.py).

The model is a random GPT-2 of 2 layers, 64 wide, 4 heads, GPT-2's 50,257-token vocabulary and
1,024 positions (what a new user tried: 14 minutes for zero-shot + ICL on one seed). Tasks are
random tokens with each task's option count and typical token lengths (input, option); MetaL's
prompt is a random 20-slot prefix of keys/values. Rounds run interleaved (method x before/after);
the figures are medians over rounds; the last line is JSON.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer('queries', 100, 'test examples a task (the real sets: up to 500)')
flags.DEFINE_integer('rounds', 3, 'interleaved rounds')
flags.DEFINE_list('methods', ['zero_shot', 'icl', 'metal'], 'which methods to time')
flags.DEFINE_bool('before', True, 'also time the recomputing path (slow for ICL)')
flags.DEFINE_integer('seed', 0, 'data and model seed')
FLAGS = flags.FLAGS

# name: (options, input tokens (mean), option tokens (max)); typical of the real sets under
# GPT-2's tokenizer.
TASKS = {'sst2': (2, 24, 1), 'ag_news': (4, 45, 2), 'trec': (6, 12, 3), 'cb': (3, 75, 1),
         'rte': (2, 60, 2), 'dbpedia': (14, 55, 3)}
K = 16  # demonstrations (ICL) / examples the PGM reads
P = 20


def build_model(tmp: str):
  import torch
  import transformers
  from metal_jax.models.hf import load_lm
  torch.manual_seed(FLAGS.seed)
  cfg = transformers.GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=4,
                                n_positions=1024)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp)
  return load_lm(tmp)


def build_jobs(lm, method: str, rng, spec):
  import numpy as np
  from metal_jax.models import KV
  from metal_jax.pgm import Prompt
  from metal_jax.serving.scoring import Job
  c = lm.config
  prompt = None
  if method == 'metal':
    shape = (c.n_layers, 1, P, c.n_kv_heads, c.head_dim)
    prompt = Prompt(kv=KV(*(np.asarray(rng.normal(size=shape), np.float32) for _ in range(2))))
  jobs = []
  for name, (n_opt, x_len, y_len) in TASKS.items():
    toks = lambda n: rng.integers(100, c.vocab_size, size=max(1, n)).astype(np.int32)
    length = lambda: int(rng.integers(x_len // 2, 3 * x_len // 2 + 1))
    options = [toks(int(rng.integers(1, y_len + 1))) for _ in range(n_opt)]
    demos = (np.concatenate([np.concatenate([toks(length()), options[int(rng.integers(n_opt))]])
                             for _ in range(K)]) if method == 'icl' else np.zeros(0, np.int32))
    queries = []
    for _ in range(FLAGS.queries):
      x = toks(length())
      queries.append((x, x, options))
    jobs.append(Job(prompt, demos, queries, spec))
  return jobs


def main(argv):
  del argv
  import jax
  import numpy as np
  from metal_jax.data.episodes import EpisodeSpec
  from metal_jax.serving import scoring
  command = 'python bench/eval_throughput.py ' + ' '.join(
      shlex.quote(a) for a in sys.argv[1:])
  load0 = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    lm = build_model(tmp)
  spec = EpisodeSpec(prompt_len=P, max_len=1024)
  rng = np.random.default_rng(FLAGS.seed)
  jobs = {m: build_jobs(lm, m, rng, spec) for m in FLAGS.methods}
  pairs = {m: sum(len(q[2]) for j in js for q in j.queries) for m, js in jobs.items()}
  paths = {'after': lambda js: scoring.score_jobs(lm.module, lm.params, js)}
  if FLAGS.before:
    paths['before'] = lambda js: [scoring.recompute_scores(lm.module, lm.params, j) for j in js]

  def run(path, m):
    t0 = time.perf_counter()
    out = jax.block_until_ready(paths[path](jobs[m]))
    return time.perf_counter() - t0, out

  print(f'tasks: {", ".join(f"{n} ({o} options)" for n, (o, _, _) in TASKS.items())}; '
        f'{FLAGS.queries} test examples each; pairs: {pairs}')
  first, diffs = {}, {}
  for m in FLAGS.methods:  # first calls: compilation included, and the numbers agree
    outs = {}
    for path in paths:
      first[f'{m}/{path}'], outs[path] = run(path, m)
    if 'before' in outs:
      diffs[m] = max(float(np.max(np.abs(a - b))) for ja, jb in zip(outs['after'], outs['before'])
                     for a, b in zip(ja, jb) if a.size)
    print(f'first call (with compilation) {m}: ' + ', '.join(
        f'{p} {first[f"{m}/{p}"]:.1f} s' for p in paths)
        + (f'; max |after - before| {diffs[m]:.1e}' if m in diffs else ''))
  times = {f'{m}/{p}': [] for m in FLAGS.methods for p in paths}
  for r in range(FLAGS.rounds):
    for m in FLAGS.methods:
      for p in paths:
        dt, _ = run(p, m)
        times[f'{m}/{p}'].append(dt)
    print(f'round {r + 1}/{FLAGS.rounds}: ' + ', '.join(
        f'{k} {v[-1]:.2f} s ({pairs[k.split("/")[0]] / v[-1]:,.0f} pairs/s)'
        for k, v in times.items()), flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  rate = {k: pairs[k.split('/')[0]] / v for k, v in med.items()}
  speedup = {m: med[f'{m}/before'] / med[f'{m}/after'] for m in FLAGS.methods if 'before' in paths}
  for m in FLAGS.methods:
    line = f'{m}: after {rate[f"{m}/after"]:,.0f} pairs/s'
    if m in speedup:
      line += f', before {rate[f"{m}/before"]:,.0f} pairs/s: {speedup[m]:.1f}x'
    print(line)
  load1 = os.getloadavg()[0]
  print(f'load average (1 min) at start {load0:.2f}, at end {load1:.2f} ({os.cpu_count()} cores)')
  print(f'reproduce: {command}')
  print(json.dumps({'command': command, 'queries_per_task': FLAGS.queries, 'pairs': pairs,
                    'median_s': med, 'pairs_per_s': rate, 'speedup_after_vs_before': speedup,
                    'first_call_s': first, 'max_abs_diff': diffs, 'rounds': FLAGS.rounds,
                    'load_average_1min': {'start': load0, 'end': load1},
                    'versions': {'jax': jax.__version__}}))


if __name__ == '__main__':
  app.run(main)
