"""eval.py's body: a trained run's config and PGM -> every method on the unseen test tasks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from typing import Sequence

import numpy as np

from metal_jax import evaluation, experiment
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
  task (ANALYSES), one PGM pass per n_P, written to WORKDIR/eval_iterative by default.
  """
  if analysis and analysis not in ANALYSES:
    raise FlagError(f'--analysis={analysis}: choose one of {sorted(ANALYSES)}')
  if max_test_examples < 0:
    raise FlagError(f'--max_test_examples={max_test_examples}: must be >= 0 (0: every example)')
  seed_list = parse_ints(seeds, 'seeds')  # the flags are checked before anything loads
  method_list, not_implemented = methods_lib.resolve(methods)
  if analysis:
    method_list, not_implemented = list(ANALYSES[analysis]['methods']), {}
  tr = experiment.load_trained(workdir)
  config, step = tr.config, tr.step
  split_t = tuple(parse_ints(split, 'split')) if split else (
      config.n_prompt_examples, config.n_lm_examples)
  if len(split_t) != 2:
    raise FlagError(f'--split={",".join(split)}: expected "n_P,n_L"')
  # BBTv2's budget: the flag, else the run config's eval.bbt_budget, else the method default;
  # then --hparams=method.field=value on top.
  bbt_budget = bbt_budget or int(config.get('eval', {}).get('bbt_budget', 0))
  base = {'bbtv2': methods_lib.REGISTRY['bbtv2'].Hparams(budget=bbt_budget)} if bbt_budget else {}
  hp = methods_lib.hparams_from(hparams, base)
  registry = methods_lib.REGISTRY
  if analysis:
    registry = {m: obj for m, (obj, _) in ANALYSES[analysis]['methods'].items()}
    hp = {m: h for m, (_, h) in ANALYSES[analysis]['methods'].items()}

  locator, run_setting = experiment.data_location(config, workdir)
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
    results = evaluation.evaluate(lm, pgm_cfg, trainable, task_seeds, spec, triples, split_t,
                                  tmp, seed=config.seed, progress=progress,
                                  tokenizer=tokenizer)
    results['hparams'] = {m: dataclasses.asdict(hp[m]) for m in method_list}
    results.update(overlap_with_meta_train=overlap, max_test_examples=max_test_examples)
    results.update(checkpoint_step=step, workdir=os.path.abspath(workdir),
                   not_implemented=not_implemented, wall_s=time.time() - t0)
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
