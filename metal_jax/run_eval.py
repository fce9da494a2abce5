"""eval.py's body: a trained run's config and PGM -> every method on the unseen test tasks."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
import zlib
from typing import Sequence

import ml_collections
import numpy as np

from metal_jax import evaluation, experiment, pgm, training
from metal_jax.errors import FlagError
from metal_jax import methods as methods_lib

log = logging.getLogger('metal_jax')


def parse_ints(items: Sequence[str], flag: str) -> list[int]:
  try:
    return [int(x) for x in items]
  except ValueError as e:
    raise FlagError(f'--{flag}={",".join(items)}: expected comma-separated integers') from None


# The analyses (--analysis=NAME): methods by result name -> (method, hyperparameters), and the
# size of the train splits they read (0: the protocol's 16).
ANALYSES = {
    'iterative': {
        'methods': {f'metal_{n}': (methods_lib.MetaLIterative(),
                                   methods_lib.IterativeHparams(examples=n)) for n in (16, 32, 64)},
        'train_k': 64},
}


# The analyses that compare PGMs trained differently: label -> (config fields that differ from
# the run's, the test splits each is evaluated at).
VARIANTS = {
    'designs': {d: ({'pgm.design': d}, None) for d in pgm.DESIGNS},
    'splits': {f'trained at ({p}, {l})': ({'n_prompt_examples': p, 'n_lm_examples': l},
                                          [(16, 0), (12, 4), (8, 8)]) for p, l in ((16, 0), (12, 4))},
}


def slug(label: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')


def variant_workdir(workdir: str, config, analysis: str, label: str, fields: dict) -> str:
  """The run itself when it already is the variant; else WORKDIR/analysis/ANALYSIS/LABEL, which
  shares the run's base LM, suite and token cache (links: nothing is pretrained or written
  twice)."""
  if all(experiment.config_get(config, k) == v for k, v in fields.items()):
    return workdir
  sub = os.path.join(workdir, 'analysis', analysis, slug(label))
  os.makedirs(sub, exist_ok=True)
  for name in ('base_lm', 'data', 'cache'):
    src, dst = os.path.join(os.path.abspath(workdir), name), os.path.join(sub, name)
    if os.path.isdir(src) and not os.path.lexists(dst):
      os.symlink(src, dst)
  return sub


def finished(workdir: str, config) -> bool:
  """Whether the run in workdir has a checkpoint at config's last step (num_steps runs only:
  an epochs run is handed to train(), which resumes and stops at once when done)."""
  try:
    _, step = training.restore_config(workdir)
  except training.NoCheckpoint:
    return False
  return 0 < config.num_steps <= step


def compare_variants(analysis: str, workdir: str, seeds: Sequence[str], out: str, progress: bool,
                     max_test_examples: int) -> str:
  """--analysis=designs|splits: each variant's PGM trained (resumed, or reused when done) with
  the run's config but VARIANTS' fields, then MetaL evaluated at each test split (each an
  eval.py run of its own, resumable); the table, results.json and a plot in the output."""
  from metal_jax import run_train  # train.py's body; only this analysis needs it
  config, _ = training.restore_config(workdir)
  config = ml_collections.ConfigDict(config)
  final = out or os.path.join(workdir, f'eval_{analysis}')
  rows = {}
  for label, (fields, tests) in VARIANTS[analysis].items():
    cfg = config.copy_and_resolve_references()
    cfg.update_from_flattened_dict({**fields, 'progress': progress})
    sub = variant_workdir(workdir, config, analysis, label, fields)
    log.info('%s: %s in %s', analysis, label, sub)
    if not finished(sub, cfg):
      stopped = run_train.train(cfg, sub)['preempted_at']  # from scratch, or resumed
      if stopped is not None:  # SIGTERM: the checkpoint is saved; nothing unfinished is scored
        msg = (f'--analysis={analysis}: preempted while training {label} (saved at step '
               f'{stopped} in {sub}); rerun the same command to resume')
        log.info(msg)
        return msg
    for p, l in tests or [(cfg.n_prompt_examples, cfg.n_lm_examples)]:
      where = os.path.join(final, 'runs', slug(f'{label} tested at {p} {l}'))
      main(workdir=sub, split=[str(p), str(l)], seeds=seeds, methods=['metal'], out=where,
           progress=progress, max_test_examples=max_test_examples)
      with open(os.path.join(where, 'results.json')) as f:
        r = json.load(f)['methods']['metal']
      rows[(label, (p, l))] = (r['mean']['metaicl_f1'], r['std_over_seeds']['metaicl_f1'])
  md = evaluation.write_comparison(final, analysis, rows, parse_ints(seeds, 'seeds'))
  log.info('wrote %s', final)
  return md


def method_hparams(config, hparams: Sequence[str] = (), bbt_budget: int = 0) -> dict:
  """Each method's hyperparameters as eval.py runs them on a run with this config: BBTv2's
  budget is bbt_budget, else the config's eval.bbt_budget, else the method default; then
  --hparams=method.field=value on top."""
  bbt_budget = bbt_budget or int(config.get('eval', {}).get('bbt_budget', 0))
  base = {'bbtv2': methods_lib.REGISTRY['bbtv2'].Hparams(budget=bbt_budget)} if bbt_budget else {}
  return methods_lib.hparams_from(hparams, base)


def main(*, workdir: str, split: Sequence[str] = (), seeds: Sequence[str] = ('100', '13', '21', '42'),
         methods: Sequence[str] = ('all',), hparams: Sequence[str] = (), bbt_budget: int = 0,
         out: str = '', progress: bool = True, setting_path: str = '', data_dir: str = '',
         max_test_examples: int = 0, allow_overlap: bool = False, analysis: str = '') -> str:
  """Lists are absl list flags' values (eval.py): --seeds=100,13 gives ['100', '13'].

  setting_path / data_dir (a setting file's path; directories as --config.data_dir takes them)
  evaluate on other tasks than the run's: test tasks the run meta-trained on are refused unless
  allow_overlap (then listed in results.json's overlap_with_meta_train). max_test_examples caps
  each test split at a seeded sample (kept in file order) for quick looks; 0: the whole split.

  analysis: '' (the methods), or 'iterative': MetaL with 16, 32 and 64 examples of each test
  task (ANALYSES), one PGM pass per n_P, written to WORKDIR/eval_iterative by default; or
  'designs' / 'splits' (VARIANTS): PGMs trained like the run but for one field (each design;
  (n_P, n_L) = (16, 0) and (12, 4)), trained or reused, each evaluated (MetaL) at its test
  splits; tables and a plot in WORKDIR/eval_{analysis}.
  """
  if analysis and analysis not in ANALYSES and analysis not in VARIANTS:
    raise FlagError(f'--analysis={analysis}: choose one of {sorted(ANALYSES) + sorted(VARIANTS)}')
  if max_test_examples < 0:
    raise FlagError(f'--max_test_examples={max_test_examples}: must be >= 0 (0: every example)')
  seed_list = parse_ints(seeds, 'seeds')  # the flags are checked before anything loads
  if analysis in VARIANTS:
    return compare_variants(analysis, workdir, seeds, out, progress, max_test_examples)
  method_list = (list(ANALYSES[analysis]['methods']) if analysis
                 else methods_lib.resolve(methods))
  tr = experiment.load_trained(workdir)
  config, step = tr.config, tr.step
  split_t = tuple(parse_ints(split, 'split')) if split else (
      config.n_prompt_examples, config.n_lm_examples)
  if len(split_t) != 2:
    raise FlagError(f'--split={",".join(split)}: expected "n_P,n_L"')
  hp = method_hparams(config, hparams, bbt_budget)
  registry = methods_lib.REGISTRY
  if analysis:
    registry = {m: obj for m, (obj, _) in ANALYSES[analysis]['methods'].items()}
    hp = {m: h for m, (_, h) in ANALYSES[analysis]['methods'].items()}

  locator, run_setting = experiment.data_location(config, workdir)
  run_locator = locator
  setting, overlap = run_setting, []
  if setting_path or data_dir:
    other = config.copy_and_resolve_references()
    other.data_dir = data_dir if data_dir else config.data_dir
    other.setting = setting_path if setting_path else config.setting
    locator, setting = experiment.data_location(other, workdir)
    overlap = sorted(set(setting['test']) & set(run_setting['train']))
    if overlap and not allow_overlap:
      raise FlagError(f'--setting={other.setting}: test tasks {overlap} are among the tasks this '
                      'run meta-trained on; --allow_overlap evaluates them anyway (marked in '
                      'results.json)')
  lm, pgm_cfg, spec, trainable, tokenizer = tr.lm, tr.pgm_cfg, tr.spec, tr.trainable, tr.tokenizer
  task_seeds = evaluation.load_task_seeds(
      locator, setting['test'], seed_list, tokenizer, os.path.join(workdir, 'cache', 'tokenized'),
      config.max_example_len, train_k=ANALYSES[analysis]['train_k'] if analysis else 0)
  if max_test_examples:
    for ts in task_seeds:
      if len(ts.test) > max_test_examples:
        rng = np.random.default_rng(zlib.crc32(f'{ts.task}/{ts.seed}'.encode()))
        ts.test = ts.test.subset(sorted(rng.choice(len(ts.test), max_test_examples,
                                                   replace=False).tolist()))
  log.info('evaluating step %d of %s on %d test tasks x %d seeds, split %s, methods %s', step,
           workdir, len(setting['test']), len(seed_list), split_t, method_list)

  final = out or os.path.join(workdir, f'eval_{analysis}' if analysis else 'eval')
  # Finished (method, task, seed) records go to FINAL.partial: a rerun of the same evaluation (same
  # checkpoint, tasks, seeds, split, methods and hyperparameters) continues from them; any other
  # evaluation starts afresh. eval/ itself is replaced only when everything is done.
  tmp = f'{final}.partial'
  params = {'checkpoint_step': step, 'workdir': os.path.abspath(workdir), 'split': list(split_t),
            'seeds': seed_list, 'methods': method_list, 'tasks': list(setting['test']),
            'hparams': {m: dataclasses.asdict(hp[m]) for m in method_list},
            'max_test_examples': max_test_examples, 'seed': config.seed}
  params = json.loads(json.dumps(params))
  params_file = os.path.join(tmp, 'params.json')
  try:
    with open(params_file) as f:
      resumable = json.load(f) == params
  except (OSError, ValueError):
    resumable = False
  if resumable:
    n = sum(len(fs) for _, _, fs in os.walk(os.path.join(tmp, 'done')))
    log.info('continuing the evaluation in %s: %d (method, task, seed) finished', tmp, n)
  else:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(params_file, 'w') as f:
      json.dump(params, f)
  t0 = time.time()
  try:
    triples = [(m, registry[m], hp[m]) for m in method_list]
    # The run's meta-train tasks, loaded once if a meta-learned baseline asks (MetaPrompting).
    meta_tasks = functools.cache(lambda: experiment.meta_train_tasks(
        config, run_locator, run_setting, tokenizer, workdir))
    results = evaluation.evaluate(lm, pgm_cfg, trainable, task_seeds, spec, triples, split_t,
                                  tmp, seed=config.seed, progress=progress, tokenizer=tokenizer,
                                  meta_tasks=meta_tasks,
                                  cache_dir=os.path.join(workdir, 'cache', 'baselines'),
                                  run_key=f'{config.model}/{config.seed}')
    results['hparams'] = {m: dataclasses.asdict(hp[m]) for m in method_list}
    results.update(overlap_with_meta_train=overlap, max_test_examples=max_test_examples)
    results.update(checkpoint_step=step, workdir=os.path.abspath(workdir),
                   wall_s=time.time() - t0)
    md = evaluation.write_report(tmp, results)
  except BaseException:
    # The finished (method, task, seed) records stay for a rerun; the earlier eval/ stays as it was.
    log.warning('evaluation stopped; what finished is kept in %s: rerun the same command to '
                'continue', tmp)
    raise
  shutil.rmtree(os.path.join(tmp, 'done'), ignore_errors=True)
  os.remove(params_file)
  # Replace the previous eval/ only now, so a failed run never leaves stale or partial results.
  old = f'{final}.old-{os.getpid()}'
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)
  log.info('wrote %s in %.0f s', final, time.time() - t0)
  return md
