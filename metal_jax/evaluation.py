"""Option scoring and metrics, MetaICL-style.

Every test example is scored once per option: the mean per-token negative
log-likelihood of the option's tokens under the frozen LM given prompt + X^L + x;
the prediction is the option with the lowest score. The prompt and X^L are encoded
once per task and the (example, option) pairs of several tasks share batched calls
at bucketed shapes (serving.scoring: the same path serve.py answers with).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metal_jax import atomic, pgm
from metal_jax.data.episodes import (EpisodeSpec, build_pgm_half, collate_pgm, concat_examples,
                                     pgm_length)
from metal_jax.data.tasks import DataError, TokenizedTask, load_tokenized
from metal_jax.errors import FlagError, UserError
from metal_jax.serving import scoring

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
  return float(f1_score([g.strip() for g in golds], [p.strip() for p in predictions],
                        average='macro', zero_division=0))


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
  return float(np.mean([p.strip() == g.strip() for p, g in zip(predictions, golds)]))


def metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict:
  """In percent, as the paper reports them."""
  return {'metaicl_f1': 100 * metaicl_f1(predictions, golds),
          'sklearn_f1': 100 * sklearn_f1(predictions, golds),
          'accuracy': 100 * accuracy(predictions, golds)}


# ----------------------------------------------------------------------------- scoring


def task_job(prompt: pgm.Prompt | None, demos: TokenizedTask, demo_idx: Sequence[int],
             queries: TokenizedTask, spec: EpisodeSpec) -> scoring.Job:
  """One task's scoring: `prompt` (batch 1, or None) and X^L (examples demo_idx of `demos`)
  before each query of `queries`, each of its options scored."""
  return scoring.Job(prompt, concat_examples(demos, demo_idx),
                     list(zip(queries.input_first, queries.input_rest, queries.option_ids)), spec)


def score_tasks(module, params, jobs: Sequence[scoring.Job], rows: int = 32
                ) -> list[list[np.ndarray]]:
  """Every job's option scores (per job, per query, [n_options]); the rows of several tasks fill
  the same calls and each task's prompt and demonstrations are encoded once (serving.scoring,
  the path serve.py answers with)."""
  r = min(8, rows)
  return scoring.score_jobs(module, params, jobs, rows_per_block=r,
                            blocks_per_call=max(1, rows // r))


def score_options(module, params, prompt: pgm.Prompt | None, demos: TokenizedTask,
                  demo_idx: Sequence[int], queries: TokenizedTask, spec: EpisodeSpec,
                  rows: int = 32) -> list[np.ndarray]:
  """Mean option-token NLL for every (query, option): a list (per query) of [n_options] arrays.

  `prompt` has batch 1 (one prompt per task and seed); `demo_idx` picks X^L from `demos`.
  """
  return score_tasks(module, params, [task_job(prompt, demos, demo_idx, queries, spec)], rows)[0]


class NonFiniteScores(UserError):
  """Option scores with a NaN or inf (a diverged PGM, say): no prediction or F1 is made from them.
  The message names the method, task and seed."""


def predict(scores: list[np.ndarray], queries: TokenizedTask, *, method: str = '',
            task: str = '', seed: int | str = '') -> list[str]:
  """The option with the lowest score (mean NLL) of each query. Scores that are not all finite
  raise NonFiniteScores naming method, task and seed (np.argmin would pick option 0 of a NaN)."""
  bad = [q for q, s in enumerate(scores) if not np.all(np.isfinite(np.asarray(s, np.float64)))]
  if bad:
    named = (('method', method), ('task', task or getattr(queries, 'path', '')), ('seed', seed))
    where = ', '.join(f'{k} {v}' for k, v in named if v != '')
    raise NonFiniteScores(
        f'{where}: {len(bad)} of {len(scores)} queries have non-finite option scores (query '
        f'{bad[0]}: {[float(x) for x in np.asarray(scores[bad[0]]).ravel()]}); no prediction or '
        'F1 is computed from them. A diverged PGM checkpoint? (metrics.jsonl shows its loss)')
  return [queries.raw['options'][q][int(np.argmin(s))] for q, s in enumerate(scores)]


def prompt_for(cfg: pgm.PGMConfig, module, params, trainable, demos: TokenizedTask,
               prompt_idx: Sequence[int], spec: EpisodeSpec,
               prev: pgm.Prompt | None = None) -> pgm.Prompt:
  """One PGM forward pass over X^P (the examples prompt_idx of `demos`) -> a batch-1 prompt;
  `prev`: the prompt of the examples before (iterative generation)."""
  tokens = build_pgm_half(concat_examples(demos, prompt_idx), spec)
  b = collate_pgm([tokens], spec, pgm_length([tokens], spec))
  return _generate(cfg, module, params, trainable, jnp.asarray(b['pgm_ids']),
                   jnp.asarray(b['pgm_mask']), prev)


def iterative_prompt(cfg: pgm.PGMConfig, module, params, trainable, demos: TokenizedTask,
                     idx: Sequence[int], spec: EpisodeSpec) -> tuple[pgm.Prompt, int]:
  """(prompt, PGM passes) for more examples than one pass reads: idx in chunks of n_P, each
  pass reading its chunk and the previous pass's prompt (the paper's iterative generation)."""
  n = spec.n_prompt_examples
  chunks = [list(idx[i:i + n]) for i in range(0, len(idx), n)]
  prompt = None
  for chunk in chunks:
    prompt = prompt_for(cfg, module, params, trainable, demos, chunk, spec, prompt)
  return prompt, len(chunks)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(cfg, module, params, trainable, ids, mask, prev=None):
  return pgm.generate(cfg, module, params, trainable, ids, mask, train=False, prev=prev)



# ----------------------------------------------------------------------------- the protocol



@dataclasses.dataclass
class TaskSeed:
  """One test task under one seed: its 16 `_train` examples and its `_test` split."""
  task: str
  seed: int
  train: TokenizedTask
  test: TokenizedTask


@dataclasses.dataclass
class MethodOutput:
  prompt: pgm.Prompt | None
  demo_idx: list[int]  # X^L: examples of the task's train split shown to the LM
  forward_passes: int = 0
  backward_passes: int = 0
  note: str = ''
  text: str | None = None  # the prompt as text, when the method wrote one (else decoded tokens)


def load_task_seeds(data_dir, tasks: Sequence[str], seeds: Sequence[int], tokenizer,
                    cache_dir: str, max_example_len: int, k: int = 16,
                    train_k: int = 0) -> list[TaskSeed]:
  """Each test task's k-shot train and test files per seed; data_dir: a tasks.TaskLocator
  (experiment.data_location's) or one data directory. train_k > 0 reads the train split from
  the train_k-shot file instead (more examples: iterative generation)."""
  from metal_jax.data.tasks import TaskLocator
  locator = TaskLocator.of(data_dir)
  k_train = train_k or k
  out = []
  for task in tasks:
    for seed in seeds:
      train = load_tokenized(locator.task_file(task, k_train, seed, 'train'), tokenizer,
                             cache_dir, max_example_len)
      test = load_tokenized(locator.task_file(task, k, seed, 'test'), tokenizer, cache_dir,
                            max_example_len)
      if len(train) < k_train:
        raise DataError(f'{train.path}: {len(train)} examples, the protocol needs {k_train}')
      out.append(TaskSeed(task, seed, train, test))
  return out


def split_indices(n_prompt: int, n_lm: int, k: int = 16) -> tuple[list[int], list[int]]:
  """The k train examples split into X^P (first n_P) and X^L (the next n_L)."""
  if n_prompt + n_lm > k:
    raise FlagError(f'--split={n_prompt},{n_lm}: needs {n_prompt + n_lm} examples; each test task '
                    f'has {k}')
  return list(range(n_prompt)), list(range(n_prompt, n_prompt + n_lm))


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method may read, fixed for one evaluation."""
  lm: Any  # models.hf.LoadedLM: the frozen LM
  pgm_cfg: pgm.PGMConfig
  trainable: dict  # the PGM's trainable pytree
  spec: EpisodeSpec
  split: tuple[int, int]  # (n_P, n_L)
  others: dict  # (task, seed) -> another test task's train split (the metal_shuffled control)
  tokenizer: Any = None  # text <-> ids: discrete prompts (RLPrompt's decoding; readable prompts)
  meta_tasks: Any = None  # () -> the run's meta-train tasks (meta-learned baselines), or None
  cache_dir: str = ''  # where meta-learned baselines keep what they trained (the run's workdir)
  run_key: str = ''  # the run (workdir, model, seed): what cached baselines were trained for


def method_prompt(name: str, method, hp, ts: TaskSeed, ctx: Context, rng) -> MethodOutput:
  """The prompt (and demonstrations) method `name` gives the frozen LM for one task and seed."""
  return method.prompt(ctx, ts, hp, rng)


def _mean_metrics(rows: Sequence[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def evaluate(lm, pgm_cfg, trainable, task_seeds: Sequence[TaskSeed], spec: EpisodeSpec,
             methods: Sequence[tuple[str, Any, Any]], split: tuple[int, int], out_dir: str, *,
             seed: int = 0, progress: bool = True, tokenizer=None, meta_tasks=None,
             cache_dir: str = '', run_key: str = '') -> dict:
  """Runs every method on every task and seed; writes predictions; returns results.json's content.

  `methods`: (name, method, hyperparameters) triples (metal_jax.methods.REGISTRY's objects).
  Each finished (method, task, seed) is recorded under out_dir/done as it completes, and a
  record found there is used instead of redoing it: an interrupted evaluation continues.
  `tokenizer` decodes discrete prompts into readable text (results and predictions files);
  meta_tasks, cache_dir and run_key serve the meta-learned baselines (Context).
  """
  tasks = list(dict.fromkeys(ts.task for ts in task_seeds))
  names = [name for name, _, _ in methods]
  if 'metal_shuffled' in names and len(tasks) < 2:
    raise FlagError('--methods: the metal_shuffled control needs at least 2 test tasks (it '
                    'reads X^P from another task)')
  by_key = {(ts.task, ts.seed): ts for ts in task_seeds}
  # The control: X^P taken from the next test task (same seed).
  others = {(ts.task, ts.seed): by_key[(tasks[(tasks.index(ts.task) + 1) % len(tasks)], ts.seed)].train
            for ts in task_seeds}
  seeds = sorted({ts.seed for ts in task_seeds})
  results = {'split': list(split), 'seeds': seeds, 'tasks': tasks, 'methods': {}}
  ctx = Context(lm, pgm_cfg, trainable, spec, tuple(split), others, tokenizer, meta_tasks,
                cache_dir, run_key)
  bar = tqdm(total=len(methods) * len(task_seeds), desc='evaluate', dynamic_ncols=True,
             disable=not progress)
  for name, method_obj, hp in methods:
    records = {}
    for task in tasks:
      mine = [ts for ts in task_seeds if ts.task == task]
      path = lambda ts: os.path.join(out_dir, 'done', name, task, f'{ts.seed}.json')
      todo = []
      for ts in mine:
        if os.path.exists(path(ts)):
          with open(path(ts)) as f:
            records[(task, ts.seed)] = json.load(f)
          bar.update(1)
        else:
          todo.append(ts)
      for ts, rec in _evaluate_seeds(name, method_obj, hp, todo, ctx, seed, out_dir, bar):
        atomic.write_json(path(ts), rec)
        records[(task, ts.seed)] = rec
    results['methods'][name] = _method_summary(tasks, seeds, records)
  bar.close()
  return results


def _method_summary(tasks: Sequence[str], seeds: Sequence[int], records: dict) -> dict:
  """A method's results from its (task, seed) records: per task the seeds' metrics and mean;
  the mean over tasks and the standard deviation over seeds of the per-seed task means (the
  paper's "mean (std)"); costs per task and seed; notes; readable prompts."""
  per_task = {}
  for t in tasks:
    rows = {str(s): records[(t, s)]['metrics'] for s in seeds}
    per_task[t] = {'seeds': rows, 'mean': _mean_metrics(list(rows.values()))}
    texts = {str(s): records[(t, s)]['prompt_text'] for s in seeds
             if records[(t, s)].get('prompt_text') is not None}
    if texts:
      per_task[t]['prompt_text'] = texts
  by_seed = [_mean_metrics([records[(t, s)]['metrics'] for t in tasks]) for s in seeds]
  recs = list(records.values())
  return {
      'tasks': per_task,
      'mean': _mean_metrics([v['mean'] for v in per_task.values()]),
      'std_over_seeds': {k: float(np.std([r[k] for r in by_seed])) for k in by_seed[0]},
      'cost': {'forward_passes_per_task': float(np.mean([r['forward'] for r in recs])),
               'backward_passes_per_task': float(np.mean([r['backward'] for r in recs])),
               'median_wall_s_per_task': float(np.median([r['wall'] for r in recs]))},
      'note': '; '.join(sorted({r['note'] for r in recs if r['note']})),
  }


# Seeds whose prompts took this long in all are scored and recorded before the next seed's
# prompt: cheap methods score a task's seeds in one batched call, a per-task tuner (seconds to
# minutes a seed) keeps every finished seed.
RECORD_EVERY_S = 30.0


def method_rng(seed: int, method: str, ts: TaskSeed) -> jax.Array:
  """The key a method's prompt for one task and seed is drawn with: the run's seed, the method,
  the task and the few-shot seed, and nothing else (so methods, tasks and seeds may be run in any
  order or alone, as bench/baselines.py does, and give the same prompts)."""
  return jax.random.key(zlib.crc32(f'{seed}/{method}/{ts.task}/{ts.seed}'.encode()))


def _evaluate_seeds(method: str, method_obj, hp, task_seeds: Sequence[TaskSeed], ctx: Context,
                    seed: int, out_dir: str, bar):
  """Yields (task seed, record) for one method on one task's seeds: prompts, scores (several
  seeds in one call, until their prompts took RECORD_EVERY_S), predictions files."""
  group, spent = [], 0.0
  for i, ts in enumerate(task_seeds):
    bar.set_postfix(method=method, task=ts.task)
    rng = method_rng(seed, method, ts)
    t0 = time.perf_counter()
    out = method_prompt(method, method_obj, hp, ts, ctx, rng)
    jax.block_until_ready(out.prompt)
    wall = time.perf_counter() - t0
    group.append((ts, out, wall))
    spent += wall
    if spent < RECORD_EVERY_S and i + 1 < len(task_seeds):
      continue
    jobs = []
    for ts_, out_, _ in group:
      # A prompt longer than spec.prompt_len (BBTv2's 50) leaves fewer positions for the input.
      spec_m = ctx.spec if out_.prompt is None else ctx.spec.with_prompt_len(out_.prompt.length)
      jobs.append(task_job(out_.prompt, ts_.train, out_.demo_idx, ts_.test, spec_m))
    for (ts_, out_, wall_), scores in zip(group, score_tasks(ctx.lm.module, ctx.lm.params, jobs)):
      preds = predict(scores, ts_.test, method=method, task=ts_.task, seed=ts_.seed)
      text = out_.text if out_.text is not None else prompt_text(ctx.tokenizer, out_.prompt)
      write_predictions(os.path.join(out_dir, 'predictions', method,
                                     f'{ts_.task}_{ts_.seed}.jsonl'), ts_.test, scores, preds, text)
      bar.update(1)
      yield ts_, {'metrics': metrics(preds, list(ts_.test.raw['output'])), 'wall': wall_,
                  'forward': out_.forward_passes, 'backward': out_.backward_passes,
                  'note': out_.note, 'prompt_text': text}
    group, spent = [], 0.0


def prompt_text(tokenizer, prompt: pgm.Prompt | None) -> str | None:
  """A discrete prompt's tokens (the PGM's discrete design, RLPrompt's, AutoPrompt's) decoded to
  text, so a user can read what was written; None for continuous prompts or no tokenizer."""
  if prompt is None or prompt.tokens is None or tokenizer is None:
    return None
  return tokenizer.decode(np.asarray(prompt.tokens)[0].tolist(), clean_up_tokenization_spaces=False)


def write_predictions(path: str, queries: TokenizedTask, scores, preds,
                      prompt_text: str | None = None) -> None:
  """One JSON line per query: input, options, scores, prediction, gold (and the prompt's text
  when it is readable)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  extra = {} if prompt_text is None else {'prompt_text': prompt_text}
  with open(path, 'w') as f:
    for q, (s, p) in enumerate(zip(scores, preds)):
      f.write(json.dumps({'input': queries.raw['input'][q], 'options': queries.raw['options'][q],
                          'scores': [float(x) for x in s], 'prediction': p,
                          'gold': queries.raw['output'][q], **extra}) + '\n')


def recompute_from_predictions(out_dir: str, results: dict) -> dict:
  """Per-method mean metrics recomputed from the per-example prediction files."""
  out = {}
  for method, r in results['methods'].items():
    task_means = []
    for task in r['tasks']:
      rows = []
      for seed in r['tasks'][task]['seeds']:
        with open(os.path.join(out_dir, 'predictions', method, f'{task}_{seed}.jsonl')) as f:
          ex = [json.loads(line) for line in f]
        rows.append(metrics([e['prediction'] for e in ex], [e['gold'] for e in ex]))
      task_means.append(_mean_metrics(rows))
    out[method] = _mean_metrics(task_means)
  return out


METRIC_NAMES = {'metaicl_f1': 'MetaICL macro-F1', 'sklearn_f1': 'sklearn macro-F1',
                'accuracy': 'accuracy'}


def write_report(out_dir: str, results: dict) -> str:
  """results.json, results.md (Table 2 / Table 4 shaped) and a bar chart of mean F1; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  methods = list(results['methods'])
  n_p, n_l = results['split']
  lines = [f'# Unseen-task evaluation, (n_P, n_L) = ({n_p}, {n_l}), seeds {results["seeds"]}', '',
           'Mean over tasks of the mean over seeds (percent). MetaICL macro-F1 averages over gold '
           'classes only and gives a never-predicted class precision 1; sklearn macro-F1 is '
           "scikit-learn's (zero_division=0).", '',
           'The std column is the standard deviation over seeds of the per-seed mean over tasks '
           '(MetaICL macro-F1).', '',
           '| method | ' + ' | '.join(METRIC_NAMES.values()) + ' | std over seeds |',
           '|---|' + '---|' * (len(METRIC_NAMES) + 1)]
  for m in methods:
    mean = results['methods'][m]['mean']
    lines.append(f'| {m} | ' + ' | '.join(f'{mean[k]:.2f}' for k in METRIC_NAMES) +
                 f' | {results["methods"][m]["std_over_seeds"]["metaicl_f1"]:.2f} |')
  lines += ['', '## MetaICL macro-F1 per task', '',
            '| task | ' + ' | '.join(methods) + ' |', '|---|' + '---|' * len(methods)]
  for task in results['tasks']:
    lines.append(f'| {task} | ' + ' | '.join(
        f'{results["methods"][m]["tasks"][task]["mean"]["metaicl_f1"]:.2f}' for m in methods) + ' |')
  lines += ['', '## Cost per task (prompt construction; scoring excluded)', '',
            '| method | LM forward passes | LM backward passes | median wall time (ms) | note |',
            '|---|---|---|---|---|']
  for m in methods:
    c = results['methods'][m]['cost']
    lines.append(f'| {m} | {c["forward_passes_per_task"]:.0f} | '
                 f'{c["backward_passes_per_task"]:.0f} | {1e3 * c["median_wall_s_per_task"]:.1f} | '
                 f'{results["methods"][m]["note"]} |')
  texts = [(m, t, s, x) for m in methods for t, v in results['methods'][m]['tasks'].items()
           for s, x in v.get('prompt_text', {}).items()]
  if texts:
    lines += ['', '## Discrete prompts, as text', '', '| method | task | seed | prompt |',
              '|---|---|---|---|']
    lines += [f'| {m} | {t} | {s} | {_md_cell(x)} |' for m, t, s, x in texts]
  md = '\n'.join(lines) + '\n'
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(md)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  plot_f1_vs_cost(results, os.path.join(out_dir, 'f1_vs_cost.png'))
  fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
  vals = [results['methods'][m]['mean']['metaicl_f1'] for m in methods]
  ax.bar(methods, vals, color='tab:blue')
  for i, v in enumerate(vals):
    ax.text(i, v + 0.5, f'{v:.1f}', ha='center', fontsize=8)
  ax.set_ylabel('MetaICL macro-F1 (mean over tasks)')
  ax.set_title(f'unseen tasks, (n_P, n_L) = ({n_p}, {n_l})')
  plt.xticks(rotation=30, ha='right')
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'f1.png'), dpi=100)
  plt.close(fig)
  return md


def write_comparison(out_dir: str, analysis: str, rows: dict, seeds: Sequence) -> str:
  """An analysis comparing PGMs (eval.py --analysis=designs|splits): rows {(PGM label, test
  split): (mean MetaICL F1, std over seeds)} -> results.json, results.md (the PGMs as rows, the
  test splits as columns: Table 7's shape for designs, the transfer table for splits) and
  {analysis}.png (grouped bars with the std over seeds as error bars); returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  labels = list(dict.fromkeys(label for label, _ in rows))
  splits = list(dict.fromkeys(split for _, split in rows))
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump({'analysis': analysis, 'seeds': [int(x) for x in seeds],
               'rows': [{'pgm': label, 'tested_at': list(split), 'metaicl_f1': m, 'std': sd}
                        for (label, split), (m, sd) in rows.items()]}, f, indent=2)
  head = ' | '.join(f'tested at ({p}, {l})' for p, l in splits)
  lines = [f'# MetaL by {analysis}: MetaICL macro-F1 (std over seeds {list(seeds)})', '',
           f'| PGM | {head} |', '|---|' + '---|' * len(splits)]
  for label in labels:
    cells = [f'{rows[(label, sp)][0]:.2f} ({rows[(label, sp)][1]:.2f})' if (label, sp) in rows
             else '' for sp in splits]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  md = '\n'.join(lines) + '\n'
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(md)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.6 * len(labels) * len(splits) + 2, 4))
  width = 0.8 / len(splits)
  for j, sp in enumerate(splits):
    xs = [i + j * width for i, label in enumerate(labels) if (label, sp) in rows]
    vals = [rows[(label, sp)] for label in labels if (label, sp) in rows]
    ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=3,
           label=f'tested at ({sp[0]}, {sp[1]})')
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
  ax.set_ylabel('MetaL MetaICL macro-F1')
  ax.set_title(f'MetaL by {analysis} (error bars: std over seeds)')
  if len(splits) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f'{analysis}.png'), dpi=100)
  plt.close(fig)
  return md


def _md_cell(text: str) -> str:
  """Text shown literally in a markdown table cell: newlines escaped, pipes quoted."""
  return json.dumps(text, ensure_ascii=False)[1:-1].replace('|', '\\|')


def plot_f1_vs_cost(results: dict, path: str) -> None:
  """The trade-off picture: mean MetaICL F1 (error bars: std over seeds) against the per-task
  cost of building the prompt, in LM passes (forward + backward; symmetric-log axis, so the
  free methods sit at 0) and in median wall time (log axis); one point per method."""
  import matplotlib.pyplot as plt
  methods = list(results['methods'])
  f1 = [results['methods'][m]['mean']['metaicl_f1'] for m in methods]
  err = [results['methods'][m]['std_over_seeds']['metaicl_f1'] for m in methods]
  cost = [results['methods'][m]['cost'] for m in methods]
  passes = [c['forward_passes_per_task'] + c['backward_passes_per_task'] for c in cost]
  walls = [max(c['median_wall_s_per_task'], 1e-4) for c in cost]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  colors = plt.get_cmap('tab20').colors
  for ax, xs, label in ((axes[0], passes, 'LM passes per task (forward + backward)'),
                        (axes[1], walls, 'median wall time per task (s)')):
    for i, (m, x, y, e) in enumerate(zip(methods, xs, f1, err)):
      ax.errorbar([x], [y], yerr=[e], fmt='o', capsize=3, color=colors[i % len(colors)])
      # Labels of points close to an earlier one (the same cost, F1 within 4) are stacked.
      k = sum(1 for x2, y2 in zip(xs[:i], f1[:i]) if abs(y2 - y) < 4 and
              (x2 == x or (x > 0 and x2 > 0 and 1 / 3 < x2 / x < 3)))
      ax.annotate(m, (x, y), textcoords='offset points', xytext=(4, 4 + 9 * k), fontsize=8)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_xscale('symlog', linthresh=1)
  axes[1].set_xscale('log')
  axes[0].set_ylabel('MetaICL macro-F1 (mean over tasks)')
  n_p, n_l = results['split']
  fig.suptitle(f'quality against prompt-construction cost, unseen tasks, (n_P, n_L) = '
               f'({n_p}, {n_l})')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
