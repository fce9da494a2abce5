"""The unseen-task evaluation (metal_jax.evaluation, run_eval, eval.py) against MetaICL's contract.

* MetaICL's macro-F1 on crafted predictions equals values computed by hand (the mean over
  gold classes only; a never-predicted class gets precision 1.0), and differs from
  scikit-learn's macro-F1 exactly where the label sets differ; sklearn_f1 is sklearn's;
* score_options (batched, padded, chunked, logits only at the option's positions) equals a
  direct per-option computation: the frozen LM on the unpadded demos + query + option, full
  logits, log-softmax, mean NLL of the option's tokens, with a prefix-KV prompt, an
  embeddings prompt, and with / without n_L demonstrations; options differ in token length;
* the LM rows score_options builds are MetaICL's direct format, token for token, for a
  hand-built example (demo, "\\n", output, "\\n\\n\\n", demo, ..., query, "\\n", option);
* end to end: a tiny train.py run, then run_eval.main writes results.json, results.md, f1.png
  and per-example predictions whose recomputed means equal results.json; costs are counted;
* a rerun never reuses stale files, and a failing rerun leaves the earlier eval/ intact;
* the metal_shuffled control reads X^P from another test task under the same seed.

Run with `pytest -s` to see the measured differences.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from conftest import tiny_run_config, tiny_run_model
from metal_jax import evaluation, lora, methods, pgm, run_eval, run_train, training
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import load_tokenized
from metal_jax.errors import FlagError
from metal_jax.models import KV
from metal_jax.models.hf import load_lm
from metal_jax.serving import scoring

ROOT = Path(__file__).resolve().parents[1]
P = 4  # prompt length of the hand-made prompts
SPEC = EpisodeSpec(n_prompt_examples=16, n_lm_examples=0, prompt_len=P, max_len=128)
SCORE_TOL = 1e-5


# ----------------------------------------------------------------------------- 1. metrics


def test_metaicl_f1_by_hand_and_differs_from_sklearn():
  # Case A: every predicted label is a gold class; gold class 'c' is never predicted.
  golds = ['a', 'a', 'b', 'b', 'c']
  preds = ['a', 'b', 'b', 'b', 'a']
  #   a: recall 1/2 (gold a -> a, b); predicted a at 0, 4 (golds a, c): precision 1/2
  #      F1 = 2 * 1/2 * 1/2 / (1/2 + 1/2) = 1/2
  #   b: recall 2/2 = 1; predicted b at 1, 2, 3 (golds a, b, b): precision 2/3
  #      F1 = 2 * 2/3 * 1 / (2/3 + 1) = (4/3) / (5/3) = 4/5
  #   c: recall 0/1 = 0; never predicted: precision 1.0 by MetaICL's rule
  #      F1 = 2 * 1 * 0 / (1 + 0) = 0  (a never-predicted gold class always has recall 0)
  #   MetaICL F1 = (1/2 + 4/5 + 0) / 3 = 13/30
  #   sklearn: labels {a, b, c}; c's precision 0/0 -> 0 (zero_division=0), F1 0: also 13/30
  #   accuracy: positions 0, 2, 3 correct = 3/5
  assert evaluation.metaicl_f1(preds, golds) == pytest.approx(13 / 30, abs=1e-12)
  assert evaluation.sklearn_f1(preds, golds) == pytest.approx(13 / 30, abs=1e-12)
  assert evaluation.accuracy(preds, golds) == pytest.approx(3 / 5, abs=1e-12)

  # Case B: a predicted label 'x' that is no gold class: sklearn averages over it, MetaICL not.
  golds = ['a', 'a', 'b', 'b']
  preds = ['a', 'x', 'b', 'b']
  #   a: recall 1/2, precision 1/1 -> F1 = 2 * 1 * 1/2 / (3/2) = 2/3
  #   b: recall 2/2, precision 2/2 -> F1 = 1
  #   x (sklearn only): precision 0/1, recall 0/0 -> 0 (zero_division=0) -> F1 0
  #   MetaICL F1 = (2/3 + 1) / 2 = 5/6;  sklearn F1 = (2/3 + 1 + 0) / 3 = 5/9
  #   accuracy = 3/4
  assert evaluation.metaicl_f1(preds, golds) == pytest.approx(5 / 6, abs=1e-12)
  assert evaluation.sklearn_f1(preds, golds) == pytest.approx(5 / 9, abs=1e-12)
  assert evaluation.accuracy(preds, golds) == pytest.approx(3 / 4, abs=1e-12)
  m = evaluation.metrics(preds, golds)  # in percent
  assert m == pytest.approx({'metaicl_f1': 500 / 6, 'sklearn_f1': 500 / 9, 'accuracy': 75.0})

  # Case C: nothing right, and the only predicted label is no gold class.
  golds = ['a', 'a', 'b']
  preds = ['x', 'x', 'x']
  #   a: recall 0, never predicted -> precision 1.0 -> F1 = 0;  b: likewise 0
  #   MetaICL F1 = 0;  sklearn over {a, b, x}: all 0 -> 0
  assert evaluation.metaicl_f1(preds, golds) == 0.0
  assert evaluation.sklearn_f1(preds, golds) == 0.0
  assert evaluation.accuracy(preds, golds) == 0.0

  # Case D: a single gold class, always predicted right: 1 under both.
  assert evaluation.metaicl_f1(['a', 'a'], ['a', 'a']) == 1.0
  assert evaluation.sklearn_f1(['a', 'a'], ['a', 'a']) == 1.0


def test_sklearn_f1_is_sklearn_and_equals_metaicl_when_labels_agree():
  rng = np.random.default_rng(0)
  for trial in range(20):
    classes = ['red', 'blue', 'green', 'gold'][:2 + trial % 3]
    golds = [classes[i] for i in rng.integers(0, len(classes), 12)]
    # Half the trials predict labels outside the gold set too.
    pool = classes + (['navy'] if trial % 2 else [])
    preds = [pool[i] for i in rng.integers(0, len(pool), 12)]
    ref = sklearn.metrics.f1_score(golds, preds, average='macro', zero_division=0)
    assert evaluation.sklearn_f1(preds, golds) == pytest.approx(ref, abs=1e-12)
    assert evaluation.accuracy(preds, golds) == pytest.approx(
        np.mean([p == g for p, g in zip(preds, golds)]), abs=1e-12)
    if set(preds) <= set(golds):  # same label set: per-class F1s coincide
      assert evaluation.metaicl_f1(preds, golds) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def tok():
  return synthetic.build_tokenizer()


def enc(tok, text: str) -> list[int]:
  ids = tok(text, add_special_tokens=False)['input_ids']
  assert tok.unk_token_id not in ids, f'{text!r} has words outside the synthetic vocabulary'
  return ids


@pytest.fixture(scope='module')
def lm(synthetic_lm_dir):
  return load_lm(str(synthetic_lm_dir))


OPTIONS = ['red', 'blue green', 'gold silver violet amber']  # 1, 2 and 4 words
DEMOS = [  # the task's few-shot examples; X^L = the first two
    {'input': 'the cat is on the table', 'output': 'red'},
    {'input': 'a dog in the river', 'output': 'blue green'},
    {'input': 'my apple', 'output': 'gold silver violet amber'},
]
QUERIES = [  # the last one has fewer options, in another order
    {'input': 'the horse', 'output': 'red', 'options': OPTIONS},
    {'input': 'an owl with a key', 'output': 'gold silver violet amber', 'options': OPTIONS},
    {'input': 'bread and butter', 'output': 'blue green', 'options': ['blue green', 'red']},
]


@pytest.fixture(scope='module')
def hand_task(tmp_path_factory, tok):
  """(demos, queries) TokenizedTasks from two tiny hand-written jsonl files."""
  d = tmp_path_factory.mktemp('hand')
  paths = {}
  for split, rows in (('train', [dict(r, options=OPTIONS) for r in DEMOS]), ('test', QUERIES)):
    paths[split] = str(d / f'hand_16_100_{split}.jsonl')
    with open(paths[split], 'w') as f:
      for r in rows:
        f.write(json.dumps({'task': 'hand', **r}) + '\n')
  demos = load_tokenized(paths['train'], tok, str(d / 'cache'))
  queries = load_tokenized(paths['test'], tok, str(d / 'cache'))
  lens = [len(o) for o in queries.option_ids[0]]
  assert lens == [1, 2, 4], lens  # "\nlabel" + 0, 1, 3 words: options of different token lengths
  return demos, queries


def make_prompt(kind, lm, seed=0):
  cfg = lm.config
  r = jax.random.split(jax.random.key(seed), 2)
  if kind == 'prefix':
    shape = (cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
    return pgm.Prompt(kv=KV(jax.random.normal(r[0], shape), jax.random.normal(r[1], shape)))
  if kind == 'embeds':
    return pgm.Prompt(embeds=0.5 * jax.random.normal(r[0], (1, P, cfg.d_model)))
  return None


def metaicl_context(queries_raw_input: str, n_l: int) -> str:
  """MetaICL's direct format by hand: demos as input "\\n" output, joined by "\\n\\n\\n"."""
  parts = [DEMOS[j]['input'] + '\n' + DEMOS[j]['output'] for j in range(n_l)]
  return '\n\n\n'.join(parts + [queries_raw_input])


# ----------------------------------------------------------------------------- 2. scoring


@functools.partial(jax.jit, static_argnums=0)
def full_logits(module, params, prompt, seqs):
  """The frozen LM on each unpadded sequence of `seqs` (batch 1, no padding, no mask): full
  logits [T, V] per sequence. One jit over the list: one compile, every sequence its own shape."""
  out = []
  for ids in seqs:
    ids = ids[None]
    if prompt is None:
      logits = module.apply({'params': params}, ids).logits[0]
    elif prompt.kv is not None:
      logits = module.apply({'params': params}, ids, prefix=prompt.kv).logits[0]
    else:  # the prompt's embeddings at positions 0..P-1, then the tokens' own embeddings
      table = params[module.config.embed_param]
      x = jnp.concatenate([prompt.embeds[0], jnp.take(table, ids[0], axis=0)])[None]
      logits = module.apply({'params': params}, input_embeds=x).logits[0, P:]
    out.append(logits)
  return out


def direct_option_nlls(lm, prompt, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
  """Per (context, option) token lists: log-softmax over the full logits of context + option,
  the mean NLL of the option's tokens."""
  seqs = [jnp.asarray(ctx + y, jnp.int32) for ctx, y in pairs]
  out = []
  for (ctx, y), logits in zip(pairs, full_logits(lm.module, lm.params, prompt, seqs)):
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    n = len(ctx)
    out.append(float(-np.mean([logp[n - 1 + j, t] for j, t in enumerate(y)])))
  return out


@pytest.mark.parametrize('kind,n_l', [('prefix', 2), ('embeds', 2), ('prefix', 0)])
def test_score_options_equals_direct_computation(lm, tok, hand_task, kind, n_l):
  demos, queries = hand_task
  prompt = make_prompt(kind, lm)
  # 8 (query, option) pairs in chunks of rows=4... the last chunk padded with copies when short.
  scores = evaluation.score_options(lm.module, lm.params, prompt, demos, list(range(n_l)),
                                    queries, SPEC, rows=4)
  assert [s.shape for s in scores] == [(3,), (3,), (2,)]
  keys = [(q, o) for q, qr in enumerate(QUERIES) for o in range(len(qr['options']))]
  refs = direct_option_nlls(lm, prompt, [
      (enc(tok, metaicl_context(QUERIES[q]['input'], n_l)),
       enc(tok, '\n' + QUERIES[q]['options'][o])) for q, o in keys])
  worst = max(abs(float(scores[q][o]) - ref) for (q, o), ref in zip(keys, refs))
  print(f'\nscore_options vs direct ({kind}, n_L={n_l}): max abs diff {worst:.2e} '
        f'(scores {min(refs):.3f}..{max(refs):.3f})')
  assert worst <= SCORE_TOL
  # predict = the option with the lowest mean NLL
  preds = evaluation.predict(scores, queries)
  assert preds == [qr['options'][int(np.argmin(s))] for qr, s in zip(QUERIES, scores)]


def test_prompt_changes_scores(lm, hand_task):
  """Not vacuous: the prompts reach the LM (different prompts, different scores)."""
  demos, queries = hand_task
  a, b, c = (evaluation.score_options(lm.module, lm.params, p, demos, [0, 1], queries, SPEC,
                                      rows=4)
             for p in (None, make_prompt('prefix', lm), make_prompt('embeds', lm)))
  for x, y in ((a, b), (a, c), (b, c)):
    assert max(np.abs(u - v).max() for u, v in zip(x, y)) > 1e-3


# ----------------------------------------------------------------------------- 3. format


@pytest.mark.parametrize('n_l', [2, 0])
def test_lm_rows_are_metaicl_direct_format(lm, tok, hand_task, n_l):
  """What the frozen LM reads for each (query, option): the task's encoded context (X^L) then the
  row's query and option, together MetaICL's direct format, token for token."""
  demos, queries = hand_task
  job = evaluation.task_job(None, demos, list(range(n_l)), queries, SPEC)
  rows = scoring.job_rows(job)
  pairs = [(q, o) for q, qr in enumerate(QUERIES) for o in range(len(qr['options']))]
  assert len(rows) == len(pairs)
  seqs = []
  for (start, query, y), (q, o) in zip(rows, pairs):
    qr = QUERIES[q]
    assert start == 0  # everything fits: the row reads the whole encoded context
    want = enc(tok, metaicl_context(qr['input'], n_l) + '\n' + qr['options'][o])
    seqs.append(list(job.demos) + query.tolist() + y.tolist())
    assert seqs[-1] == want, (q, o)
    assert y.tolist() == enc(tok, '\n' + qr['options'][o])
  # One row written out by hand: the first query with its 4-word option.
  toks = tok.convert_ids_to_tokens(seqs[pairs.index((0, 2))])
  # (the built-in tokenizer makes a newline and the label word after it one token)
  query = ['the', 'horse', '\ngold', 'silver', 'violet', 'amber']
  if n_l == 2:
    assert toks == (['the', 'cat', 'is', 'on', 'the', 'table', '\nred', '\n', '\n', '\n',
                     'a', 'dog', 'in', 'the', 'river', '\nblue', 'green', '\n', '\n', '\n']
                    + query)
  else:
    assert toks == query  # no demonstrations: the query's input is bare


# ----------------------------------------------------------------------------- 6. the control


def test_metal_shuffled_reads_another_tasks_examples_same_seed(lm, tok, tmp_path, monkeypatch):
  d = str(tmp_path / 'suite')
  setting = synthetic.write_suite(d, n_train_tasks=0, n_test_tasks=3, n_train_examples=1,
                                  n_test_examples=4)
  seeds = [100, 13]
  task_seeds = evaluation.load_task_seeds(d, setting['test'], seeds, tok,
                                          str(tmp_path / 'cache'), 256)
  by_key = {(ts.task, ts.seed): ts for ts in task_seeds}
  cfg = pgm.PGMConfig(prompt_len=P, lstm_layers=1, lora=lora.LoraConfig(rank=4, alpha=8.0))
  trainable = pgm.init_trainable(jax.random.key(0), lm.config, cfg)

  calls, others_seen = [], []
  orig_method_prompt, orig_prompt_for = evaluation.method_prompt, evaluation.prompt_for

  def method_spy(name, method, hp, ts, ctx, rng):
    others_seen.append(ctx.others)
    calls.append({'method': name, 'task': ts.task, 'seed': ts.seed})
    return orig_method_prompt(name, method, hp, ts, ctx, rng)

  def prompt_spy(cfg_, module, params, trainable_, demos, prompt_idx, spec):
    out = orig_prompt_for(cfg_, module, params, trainable_, demos, prompt_idx, spec)
    calls[-1].update(demos=demos, prompt_idx=list(prompt_idx), prompt=out)
    return out

  monkeypatch.setattr(evaluation, 'method_prompt', method_spy)
  monkeypatch.setattr(evaluation, 'prompt_for', prompt_spy)
  spec = EpisodeSpec(n_prompt_examples=16, prompt_len=P, max_len=128)
  triples = [(m, methods.REGISTRY[m], methods.NoHparams()) for m in ('metal', 'metal_shuffled')]
  res = evaluation.evaluate(lm, cfg, trainable, task_seeds, spec, triples, (16, 0),
                            str(tmp_path / 'out'), progress=False)

  others = others_seen[0]
  assert all(o is others for o in others_seen)  # one mapping for the whole evaluation
  assert set(others) == set(by_key)
  source_of = {}
  for (task, seed), source in others.items():
    match = [k for k, ts in by_key.items() if ts.train is source]
    assert len(match) == 1, "others[] must be one test task's few-shot examples"
    source_of[(task, seed)] = match[0]
    assert match[0][0] != task and match[0][1] == seed, ((task, seed), match[0])
  for seed in seeds:  # every task lends its X^P once per seed (no task serves them all)
    assert sorted(source_of[(t, seed)][0] for t in setting['test']) == sorted(setting['test'])

  assert len(calls) == 2 * len(task_seeds)
  metal = {(c['task'], c['seed']): c for c in calls if c['method'] == 'metal'}
  for c in calls:
    key = (c['task'], c['seed'])
    assert c['prompt_idx'] == list(range(16))
    if c['method'] == 'metal':
      assert c['demos'] is by_key[key].train
    else:
      assert c['demos'] is others[key] and c['demos'] is not by_key[key].train
      # The very prompt the PGM made for the other task under the same seed.
      src = source_of[key]
      for a, b in zip(jax.tree.leaves(c['prompt']), jax.tree.leaves(metal[src]['prompt'])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
          jax.tree.leaves(c['prompt']), jax.tree.leaves(metal[key]['prompt'])))
      assert diff > 1e-4  # and not this task's own prompt
  assert res['methods']['metal_shuffled']['cost']['forward_passes_per_task'] == 1
  # The control's predictions: this task's queries scored under the other task's prompt.
  key = task_seeds[0].task, task_seeds[0].seed
  shuffled = next(c for c in calls if c['method'] == 'metal_shuffled'
                  and (c['task'], c['seed']) == key)
  want = evaluation.score_options(lm.module, lm.params, shuffled['prompt'], by_key[key].train, [],
                                  by_key[key].test, spec)
  rows = read_jsonl(str(tmp_path / 'out' / 'predictions' / 'metal_shuffled'
                        / f'{key[0]}_{key[1]}.jsonl'))
  np.testing.assert_allclose([r['scores'] for r in rows], np.stack(want), rtol=1e-6)


def test_discrete_prompts_are_written_as_text(lm, tok, tmp_path):
  """The discrete design's prompt (argmax tokens at inference) is decoded with the tokenizer into
  results.json, results.md and every predictions row, so a user can read what the PGM wrote;
  continuous prompts have no text."""
  d = str(tmp_path / 'suite')
  setting = synthetic.write_suite(d, n_train_tasks=0, n_test_tasks=2, n_train_examples=1,
                                  n_test_examples=3)
  task_seeds = evaluation.load_task_seeds(d, setting['test'], [100], tok,
                                          str(tmp_path / 'cache'), 256)
  spec = EpisodeSpec(n_prompt_examples=16, prompt_len=P, max_len=128)
  out = str(tmp_path / 'out')
  results = {}
  for design in ('discrete', 'prefix'):
    cfg = pgm.PGMConfig(prompt_len=P, lstm_layers=1, design=design,
                        lora=lora.LoraConfig(rank=4, alpha=8.0))
    trainable = pgm.init_trainable(jax.random.key(0), lm.config, cfg)
    triples = [('metal', methods.REGISTRY['metal'], methods.NoHparams())]
    results[design] = evaluation.evaluate(lm, cfg, trainable, task_seeds, spec, triples, (16, 0),
                                          os.path.join(out, design), progress=False, tokenizer=tok)
    if design == 'discrete':
      ts = task_seeds[0]
      prompt = evaluation.prompt_for(cfg, lm.module, lm.params, trainable, ts.train,
                                     range(16), spec)
      want = tok.decode(np.asarray(prompt.tokens)[0].tolist(),
                        clean_up_tokenization_spaces=False)
      assert len(np.asarray(prompt.tokens)[0]) == P and want.strip()
      got = results[design]['methods']['metal']['tasks'][ts.task]['prompt_text']
      assert got == {'100': want}
      rows = read_jsonl(os.path.join(out, design, 'predictions', 'metal', f'{ts.task}_100.jsonl'))
      assert [r['prompt_text'] for r in rows] == [want] * len(rows)
      md = evaluation.write_report(os.path.join(out, design), results[design])
      assert f'| metal | {ts.task} | 100 | {evaluation._md_cell(want)} |' in md
  assert 'prompt_text' not in results['prefix']['methods']['metal']['tasks'][ts.task]


# ----------------------------------------------------------------------------- 4. end to end


E2E_METHODS = ['zero_shot', 'icl', 'metal', 'metal_shuffled', 'soft_prompt', 'bbtv2', 'autoprompt',
               'rlprompt', 'metaprompting']
E2E_HPARAMS = ['autoprompt.iters=2', 'autoprompt.num_cand=3', 'autoprompt.prompt_len=3',
               'rlprompt.steps=1', 'rlprompt.n_prompts=2', 'rlprompt.mlp_width=16',
               'metaprompting.meta_steps=2', 'metaprompting.meta_batch_tasks=2',
               'metaprompting.inner_steps=1', 'metaprompting.support_size=8',
               'metaprompting.query_size=8', 'metaprompting.prompt_len=4']
E2E_SEEDS = [100, 13]


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, tok):
  """A tiny train.py run (2 steps) and its first evaluation; returns (workdir, markdown)."""
  c = tiny_run_config(tiny_run_model(tmp_path_factory.mktemp('run_model')))
  c.batch_size = 4
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.log_every = 1
  c.eval.bbt_budget = 15  # eval.py's default for this run (the flag below overrides it)
  workdir = str(tmp_path_factory.mktemp('run'))
  run_train.train(c, workdir)
  md = run_eval.main(workdir=workdir, seeds=[str(s) for s in E2E_SEEDS],
                     methods=E2E_METHODS, bbt_budget=10, hparams=E2E_HPARAMS, progress=False)
  return workdir, md


def test_bbt_budget_from_the_run_config(trained_run, tmp_path):
  """--bbt_budget=0 takes the run config's eval.bbt_budget (15: 3 generations of 5)."""
  workdir, _ = trained_run
  out = str(tmp_path / 'eval')
  run_eval.main(workdir=workdir, seeds=['100'], methods=['bbtv2'], out=out, progress=False)
  with open(os.path.join(out, 'results.json')) as f:
    cost = json.load(f)['methods']['bbtv2']['cost']
  assert cost['forward_passes_per_task'] == 15
  # --hparams overrides a method's field by name, over the run config's budget.
  run_eval.main(workdir=workdir, seeds=['100'], methods=['bbtv2'], hparams=['bbtv2.budget=5'],
                out=out, progress=False)
  with open(os.path.join(out, 'results.json')) as f:
    res = json.load(f)
  assert res['methods']['bbtv2']['cost']['forward_passes_per_task'] == 5
  assert res['hparams']['bbtv2']['budget'] == 5 and res['hparams']['bbtv2']['popsize'] == 5


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_end_to_end_outputs_are_consistent(trained_run):
  workdir, md = trained_run
  out = os.path.join(workdir, 'eval')
  for name in ('results.json', 'results.md', 'f1.png', 'f1_vs_cost.png'):
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(out, 'results.md')) as f:
    assert f.read() == md
  with open(os.path.join(out, 'f1.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  tasks = results['tasks']
  setting = json.load(open(os.path.join(workdir, 'data', 'setting.json')))
  assert tasks == setting['test'] and len(tasks) == 2
  assert results['seeds'] == sorted(E2E_SEEDS) and results['split'] == [16, 0]
  assert list(results['methods']) == E2E_METHODS

  # Every method, task and seed has its prediction file, and nothing else is there.
  want = {(m, f'{t}_{s}.jsonl') for m in E2E_METHODS for t in tasks for s in E2E_SEEDS}
  have = {(m, f) for m in os.listdir(os.path.join(out, 'predictions'))
          for f in os.listdir(os.path.join(out, 'predictions', m))}
  assert have == want

  # Per-example files are consistent with the test split and with their own scores.
  for m in E2E_METHODS:
    for t in tasks:
      for s in E2E_SEEDS:
        rows = read_jsonl(os.path.join(out, 'predictions', m, f'{t}_{s}.jsonl'))
        test = read_jsonl(synthetic.few_shot_path(os.path.join(workdir, 'data'), t, s, 'test'))
        assert len(rows) == len(test) == 8
        for r, e in zip(rows, test):
          assert (r['input'], r['gold'], r['options']) == (e['input'], e['output'], e['options'])
          assert len(r['scores']) == len(r['options']) and np.isfinite(r['scores']).all()
          assert r['prediction'] == r['options'][int(np.argmin(r['scores']))]

  # Means in results.json == recomputed from the prediction files (library and by hand).
  recomputed = evaluation.recompute_from_predictions(out, results)
  for m in E2E_METHODS:
    mean = results['methods'][m]['mean']
    assert recomputed[m] == pytest.approx(mean, abs=1e-9)
    per_task = []
    for t in tasks:
      per_seed = []
      for s in E2E_SEEDS:
        rows = read_jsonl(os.path.join(out, 'predictions', m, f'{t}_{s}.jsonl'))
        f1 = 100 * evaluation.metaicl_f1([r['prediction'] for r in rows], [r['gold'] for r in rows])
        assert results['methods'][m]['tasks'][t]['seeds'][str(s)]['metaicl_f1'] == \
            pytest.approx(f1, abs=1e-9)
        per_seed.append(f1)
      per_task.append(np.mean(per_seed))
    assert mean['metaicl_f1'] == pytest.approx(np.mean(per_task), abs=1e-9)
    # The spread over seeds: the std of the per-seed means over tasks.
    by_seed = [np.mean([results['methods'][m]['tasks'][t]['seeds'][str(s)]['metaicl_f1']
                        for t in tasks]) for s in E2E_SEEDS]
    std = results['methods'][m]['std_over_seeds']['metaicl_f1']
    assert std == pytest.approx(np.std(by_seed), abs=1e-9)
    # results.md prints each method's mean MetaICL F1 (first metric column) and that std as stored.
    row = next(line for line in md.splitlines() if line.startswith(f'| {m} |'))
    assert row.split('|')[2].strip() == f'{mean["metaicl_f1"]:.2f}'
    assert row.split('|')[5].strip() == f'{std:.2f}'

  # Costs: prompt construction only (scoring excluded).
  cost = {m: results['methods'][m]['cost'] for m in E2E_METHODS}
  assert cost['metal']['forward_passes_per_task'] == 1
  assert cost['metal']['backward_passes_per_task'] == 0
  assert cost['metal_shuffled']['forward_passes_per_task'] == 1
  for m in ('zero_shot', 'icl'):
    assert cost[m]['forward_passes_per_task'] == cost[m]['backward_passes_per_task'] == 0
  assert cost['soft_prompt']['forward_passes_per_task'] == 10  # 10 epochs of one batch of 16
  assert cost['soft_prompt']['backward_passes_per_task'] == 10
  assert cost['bbtv2']['forward_passes_per_task'] == 10  # budget 10 = 2 generations of 5
  assert cost['bbtv2']['backward_passes_per_task'] == 0
  assert cost['autoprompt']['forward_passes_per_task'] == 2 * (1 + 3)  # iters x (1 + candidates)
  assert cost['autoprompt']['backward_passes_per_task'] == 2
  assert cost['rlprompt']['backward_passes_per_task'] == 1  # one SQL step
  assert cost['rlprompt']['forward_passes_per_task'] > 1
  assert cost['metaprompting']['forward_passes_per_task'] == 1  # the inner loop's one step
  assert 'meta-trained once on 4 tasks: 12 forward + 8 backward' in \
      results['methods']['metaprompting']['note']
  for m in ('autoprompt', 'rlprompt'):  # discrete prompts, readable
    texts = [v['prompt_text'] for v in results['methods'][m]['tasks'].values()]
    assert len(texts) == 2 and all(set(t) == {'100', '13'} for t in texts)
  assert os.listdir(os.path.join(workdir, 'cache', 'baselines'))[0].startswith('metaprompting-')
  assert results['hparams']['bbtv2']['budget'] == 10 and results['hparams']['soft_prompt']['lr'] == 4e-5
  assert results['hparams']['rlprompt']['steps'] == 1


# ----------------------------------------------------------------------------- 5. reruns


def eval_dirs(workdir: str) -> list[str]:
  """eval/ and its siblings eval.partial, eval.old-PID (not the analyses' eval_NAME/)."""
  return sorted(n for n in os.listdir(workdir) if n == 'eval' or n.startswith('eval.'))


def snapshot(directory: str) -> dict:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_iterative_analysis_reads_16_32_and_64_examples(trained_run):
  """eval.py --analysis=iterative: MetaL over the first 16, 32 and 64 examples of each test task
  (the T_64 files), one PGM pass per 16, in WORKDIR/eval_iterative; with 16 examples it is the
  protocol's MetaL (the 64-example files start with the 16), more examples change the prompt."""
  workdir, _ = trained_run
  main = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  run_eval.main(workdir=workdir, seeds=['100'], analysis='iterative', progress=False)
  res = json.load(open(os.path.join(workdir, 'eval_iterative', 'results.json')))
  assert list(res['methods']) == ['metal_16', 'metal_32', 'metal_64']
  assert [res['methods'][m]['cost']['forward_passes_per_task'] for m in res['methods']] == [1, 2, 4]
  for t in res['tasks']:
    assert (res['methods']['metal_16']['tasks'][t]['seeds']['100'] ==
            main['methods']['metal']['tasks'][t]['seeds']['100'])
  scores = {m: [r['scores'] for r in read_jsonl(os.path.join(
      workdir, 'eval_iterative', 'predictions', m, f'{res["tasks"][0]}_100.jsonl'))]
            for m in res['methods']}
  assert not np.allclose(scores['metal_16'], scores['metal_64'])
  with pytest.raises(ValueError, match='--analysis=nosuch'):
    run_eval.main(workdir=workdir, analysis='nosuch', progress=False)


def test_split_analysis_trains_the_other_pgm_and_tests_both_at_three_splits(trained_run,
                                                                           tmp_path):
  """eval.py --analysis=splits: the run is the (16, 0) PGM; the (12, 4) one is trained in
  WORKDIR/analysis (sharing the run's base LM, suite and cache), both are tested at (16, 0),
  (12, 4) and (8, 8); the table's cells are those evaluations' MetaL F1 and std; a rerun
  reuses the trained PGM. The designs analysis compares every design the same way."""
  src, _ = trained_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(src, workdir, symlinks=True)
  # A variant's training preempted (SIGTERM): the analysis stops there and scores nothing.
  with pytest.MonkeyPatch.context() as mp:
    from metal_jax import run_train
    mp.setattr(run_train, 'train', lambda cfg, sub: {'preempted_at': 1})
    msg = run_eval.main(workdir=workdir, seeds=['100', '13'], analysis='splits', progress=False,
                        max_test_examples=4)
  assert 'preempted while training trained at (12, 4) (saved at step 1' in msg, msg
  assert not os.path.exists(os.path.join(workdir, 'eval_splits', 'runs',
                                         'trained_at_12_4_tested_at_16_0'))
  md = run_eval.main(workdir=workdir, seeds=['100', '13'], analysis='splits', progress=False,
                     max_test_examples=4)
  sub = os.path.join(workdir, 'analysis', 'splits', 'trained_at_12_4')
  assert os.path.islink(os.path.join(sub, 'data'))
  cfg, steps = training.restore_config(sub)
  assert (cfg['n_prompt_examples'], cfg['n_lm_examples'], steps) == (12, 4, 2)
  out = os.path.join(workdir, 'eval_splits')
  rows = json.load(open(os.path.join(out, 'results.json')))['rows']
  assert [(r['pgm'], r['tested_at']) for r in rows] == [
      (f'trained at ({a}, {b})', t) for a, b in ((16, 0), (12, 4))
      for t in ([16, 0], [12, 4], [8, 8])]
  for r in rows:
    one = json.load(open(os.path.join(out, 'runs', run_eval.slug(
        f'{r["pgm"]} tested at {r["tested_at"][0]} {r["tested_at"][1]}'), 'results.json')))
    assert one['split'] == r['tested_at']
    assert (r['metaicl_f1'], r['std']) == (one['methods']['metal']['mean']['metaicl_f1'],
                                           one['methods']['metal']['std_over_seeds']['metaicl_f1'])
    cell = f'{r["metaicl_f1"]:.2f} ({r["std"]:.2f})'
    assert any(line.startswith(f'| {r["pgm"]} |') and cell in line for line in md.splitlines())
  assert os.path.isfile(os.path.join(out, 'splits.png'))
  mtime = os.path.getmtime(os.path.join(sub, 'metrics.jsonl'))
  run_eval.main(workdir=workdir, seeds=['100', '13'], analysis='splits', progress=False,
                max_test_examples=4)
  assert os.path.getmtime(os.path.join(sub, 'metrics.jsonl')) == mtime  # reused, not retrained
  assert set(run_eval.VARIANTS['designs']) == set(pgm.DESIGNS)


def test_an_interrupted_task_keeps_its_finished_seeds(trained_run, tmp_path, monkeypatch):
  """A method whose prompts are slow (here: every prompt counts as slow) scores and records each
  seed as it finishes: a failure at a task's second seed keeps the first, and the rerun scores
  only what was missing, to the numbers of an uninterrupted evaluation."""
  src, _ = trained_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(src, workdir)
  first = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  monkeypatch.setattr(evaluation, 'RECORD_EVERY_S', 0.0)
  orig, calls, fail = evaluation.score_tasks, [], [True]

  def failing(module, params, jobs, *a, **kw):
    calls.append(len(jobs))
    if len(calls) == 2 and fail[0]:
      fail[0] = False
      raise RuntimeError('injected failure')
    return orig(module, params, jobs, *a, **kw)

  monkeypatch.setattr(evaluation, 'score_tasks', failing)
  with pytest.raises(RuntimeError, match='injected failure'):
    run_eval.main(workdir=workdir, seeds=['100', '13'], methods=['metal'], progress=False)
  task = first['tasks'][0]
  done = os.path.join(workdir, 'eval.partial', 'done', 'metal', task)
  assert calls == [1, 1] and os.listdir(done) == ['100.json']  # seed 100 kept, 13 failed
  calls.clear()
  run_eval.main(workdir=workdir, seeds=['100', '13'], methods=['metal'], progress=False)
  assert calls == [1, 1, 1]  # the first task's seed 13, then the second task's two seeds
  resumed = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  assert resumed['methods']['metal']['tasks'] == first['methods']['metal']['tasks']


def test_rerun_replaces_eval_and_failed_rerun_leaves_it_intact_and_continues(
    trained_run, tmp_path, monkeypatch):
  src, _ = trained_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(src, workdir)  # the first eval comes along; the trained run stays pristine
  out = os.path.join(workdir, 'eval')
  first = json.load(open(os.path.join(out, 'results.json')))
  junk = os.path.join(out, 'predictions', 'metal', 'stale_task_100.jsonl')
  with open(junk, 'w') as f:
    f.write('{"prediction": "junk"}\n')
  before = snapshot(out)

  # A rerun that fails midway (the second (method, task)'s score_tasks call raises).
  orig = evaluation.score_tasks
  n_calls = [0]

  def failing(*a, **kw):
    n_calls[0] += 1
    if n_calls[0] > 1:
      raise RuntimeError('injected failure')
    return orig(*a, **kw)

  monkeypatch.setattr(evaluation, 'score_tasks', failing)
  with pytest.raises(RuntimeError, match='injected failure'):
    run_eval.main(workdir=workdir, seeds=['100', '13'], methods=['zero_shot', 'metal'],
                  progress=False)
  assert n_calls[0] == 2
  assert snapshot(out) == before  # the earlier eval/ untouched, junk and all
  assert eval_dirs(workdir) == ['eval', 'eval.partial']  # zero_shot's first task kept

  # The same command again continues: the finished (method, task) is not redone, and the
  # results are those of an uninterrupted evaluation (the first one, for these methods).
  n_calls[0] = -100
  run_eval.main(workdir=workdir, seeds=['100', '13'], methods=['zero_shot', 'metal'],
                progress=False)
  assert n_calls[0] == -100 + 3  # zero_shot's second task, metal's two
  resumed = json.load(open(os.path.join(out, 'results.json')))
  for m in ('zero_shot', 'metal'):
    assert resumed['methods'][m]['tasks'] == first['methods'][m]['tasks'], m
  assert eval_dirs(workdir) == ['eval']
  assert not os.path.exists(os.path.join(out, 'done'))
  junk = os.path.join(out, 'predictions', 'metal', 'stale_task_100.jsonl')
  with open(junk, 'w') as f:
    f.write('{"prediction": "junk"}\n')
  monkeypatch.setattr(evaluation, 'score_tasks', orig)

  # A successful rerun with fewer methods: eval/ is replaced wholesale.
  md = run_eval.main(workdir=workdir, seeds=['100', '13'], methods=['metal'], progress=False)
  assert not os.path.exists(junk)
  assert os.listdir(os.path.join(out, 'predictions')) == ['metal']
  tasks = first['tasks']
  assert sorted(os.listdir(os.path.join(out, 'predictions', 'metal'))) == sorted(
      f'{t}_{s}.jsonl' for t in tasks for s in (100, 13))
  second = json.load(open(os.path.join(out, 'results.json')))
  assert list(second['methods']) == ['metal']
  assert second['methods']['metal']['tasks'] == first['methods']['metal']['tasks']  # same numbers
  assert [line.split('|')[1].strip() for line in md.splitlines()[:12]
          if line.startswith('| metal')] == ['metal']
  assert eval_dirs(workdir) == ['eval']


def test_eval_on_other_tasks_refuses_meta_train_tasks_and_caps_test_splits(trained_run, tmp_path):
  """--setting/--data_dir evaluate other tasks: the run's meta-train tasks are refused unless
  allowed (then listed); --max_test_examples keeps a seeded sample, the same on every run."""
  workdir, _ = trained_run
  data = os.path.join(workdir, 'data')
  run_setting = synthetic.write_suite(data, n_train_tasks=4, n_test_tasks=2, n_train_examples=48,
                                      n_test_examples=8)
  trained = run_setting['train'][:1]
  # A copy of the suite where the meta-train task also has few-shot files (those of a test task).
  shutil.copytree(data, tmp_path / 'data')
  data, src = str(tmp_path / 'data'), run_setting['test'][0]
  for seed in (100,):
    for split in ('train', 'test'):
      shutil.copy(os.path.join(data, src, f'{src}_16_{seed}_{split}.jsonl'),
                  os.path.join(data, trained[0], f'{trained[0]}_16_{seed}_{split}.jsonl'))
  path = tmp_path / 'setting.json'
  path.write_text(json.dumps({'train': [], 'test': run_setting['test'][:1] + trained}))
  kw = dict(workdir=workdir, seeds=['100'], methods=['zero_shot'], progress=False,
            setting_path=str(path), data_dir=data)
  with pytest.raises(FlagError, match=rf"test tasks \['{trained[0]}'\] are among the tasks this "
                                      'run meta-trained on; --allow_overlap'):
    run_eval.main(**kw, out=str(tmp_path / 'a'))
  outs = []
  for name in ('b', 'c'):
    run_eval.main(**kw, allow_overlap=True, max_test_examples=3, out=str(tmp_path / name))
    res = json.load(open(tmp_path / name / 'results.json'))
    assert res['overlap_with_meta_train'] == trained and res['max_test_examples'] == 3
    assert res['tasks'] == run_setting['test'][:1] + trained
    rows = [json.loads(l) for l in open(tmp_path / name / 'predictions' / 'zero_shot' /
                                        f'{trained[0]}_100.jsonl')]
    assert len(rows) == 3
    outs.append([r['input'] for r in rows])
  assert outs[0] == outs[1]  # seeded: the same sample every run
  full = [json.loads(l)['input'] for l in open(os.path.join(
      data, trained[0], f'{trained[0]}_16_100_test.jsonl'))]
  assert [full.index(x) for x in outs[0]] == sorted(full.index(x) for x in outs[0])  # file order
