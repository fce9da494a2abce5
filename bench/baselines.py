"""Seconds per task and seed that RLPrompt, BBTv2 and AutoPrompt spend tuning on a trained run's
unseen test tasks, as eval.py runs them (same hyperparameters, rng and order).

  python bench/baselines.py --workdir=/tmp/demo2                    # the three, every task x seed
  python bench/baselines.py --workdir=/tmp/demo2 --against=HEAD --rounds=3
  python bench/baselines.py --workdir=/tmp/demo2 --methods=bbtv2 --tasks=kw_cls_000 --seeds=100,13

Each (side, method, round) runs in a process of its own that tunes every (task, seed) in eval.py's
order through methods.REGISTRY, so the first task's time includes compiling, as in eval.py (whose
per-method median hides it; its wall time does not). --against=REV also times the three
baselines' files as committed at git revision REV, or as found in a directory (the rest of the
code is this tree's), the two sides interleaved round by round. Per method and side: the median over tasks, seeds and rounds of
the seconds per task and seed (wall, and process CPU time: the machine may be shared), the median
total (the method's share of eval.py's wall time) and the XLA compilations in it; with --against,
the ratios and whether both sides tuned the same prompts (the largest difference between them:
0 for the same discrete tokens; rounding for BBTv2's keys/values). The last line is JSON.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

METHODS = ('rlprompt', 'bbtv2', 'autoprompt')
flags.DEFINE_string('workdir', 'runs/default', 'a finished train.py run (eval.py --workdir)')
flags.DEFINE_list('methods', list(METHODS), f'any of {METHODS}')
flags.DEFINE_list('tasks', [], 'test tasks (default: the run\'s)')
flags.DEFINE_list('seeds', ['100', '13', '21', '42'], 'few-shot seeds (eval.py\'s default)')
flags.DEFINE_list('hparams', [], 'as eval.py --hparams, e.g. "bbtv2.popsize=10"')
flags.DEFINE_string('against', '', 'a git revision (or a directory holding the three files): '
                    'also time its versions of the three files')
flags.DEFINE_integer('rounds', 1, 'interleaved rounds (a fresh process per side and method)')
flags.DEFINE_string('worker', '', '(internal) SIDE:METHOD: time one side of one method, print JSON')
flags.DEFINE_string('against_dir', '', '(internal) where the worker finds --against\'s files')
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_against(method: str, directory: str):
  """The baseline module `method` from directory (its --against version), as its own module."""
  name = f'bench_against_{method}'
  spec = importlib.util.spec_from_file_location(name, os.path.join(directory, f'{method}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file runs
  spec.loader.exec_module(module)
  return module


def fingerprint(prompt):
  """The tuned prompt as a flat float64 array (tokens when discrete, else keys and values)."""
  import numpy as np
  if prompt.tokens is not None:
    return np.asarray(prompt.tokens, np.float64).ravel()
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in (prompt.kv.k, prompt.kv.v)])


def worker(side: str, method: str) -> None:
  """Tunes every (task, seed) with one side of one method; prints one JSON line of records."""
  import jax
  import jax.monitoring
  import numpy as np
  from metal_jax import evaluation, experiment, methods as methods_lib, run_eval
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  tr = experiment.load_trained(FLAGS.workdir)
  config = tr.config
  locator, setting = experiment.data_location(config, FLAGS.workdir)
  tasks = FLAGS.tasks or list(setting['test'])
  task_seeds = evaluation.load_task_seeds(
      locator, tasks, [int(s) for s in FLAGS.seeds], tr.tokenizer,
      os.path.join(FLAGS.workdir, 'cache', 'tokenized'), config.max_example_len)
  hp = run_eval.method_hparams(config, FLAGS.hparams)[method]
  method_obj = methods_lib.REGISTRY[method]
  if side == 'against':
    module = load_against(method, FLAGS.against_dir)
    method_obj.module, method_obj.Hparams = module, module.Hparams
    hp = module.Hparams(**dataclasses.asdict(hp))
  ctx = evaluation.Context(tr.lm, tr.pgm_cfg, tr.trainable, tr.spec,
                           (config.n_prompt_examples, config.n_lm_examples), {}, tr.tokenizer)
  records = []
  for ts in task_seeds:  # eval.py's order and rng (evaluation._evaluate_seeds)
    rng = evaluation.method_rng(config.seed, method, ts)
    n0, w0, c0 = len(compiles), time.perf_counter(), time.process_time()
    out = evaluation.method_prompt(method, method_obj, hp, ts, ctx, rng)
    jax.block_until_ready(out.prompt)
    records.append({'task': ts.task, 'seed': ts.seed, 'wall': time.perf_counter() - w0,
                    'cpu': time.process_time() - c0, 'compiles': len(compiles) - n0,
                    'compile_s': sum(compiles[n0:]), 'forward': out.forward_passes,
                    'backward': out.backward_passes,
                    'prompt': fingerprint(out.prompt).tolist()})
  print(json.dumps({'side': side, 'method': method, 'records': records}))


def run_worker(side: str, method: str, against_dir: str) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), f'--worker={side}:{method}',
          f'--workdir={FLAGS.workdir}', f'--seeds={",".join(FLAGS.seeds)}',
          f'--against_dir={against_dir}']
  if FLAGS.tasks:
    argv.append(f'--tasks={",".join(FLAGS.tasks)}')
  if FLAGS.hparams:
    argv.append(f'--hparams={",".join(FLAGS.hparams)}')
  out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    sys.exit(f'worker {side}:{method} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.worker:
    side, method = FLAGS.worker.split(':')
    return worker(side, method)
  import numpy as np
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    sys.exit(f'--methods: {unknown} are not among {METHODS}')
  command = 'python bench/baselines.py ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  load0 = os.getloadavg()[0]
  sides = ['this'] + (['against'] if FLAGS.against else [])
  with tempfile.TemporaryDirectory() as against_dir:
    if FLAGS.against:
      for m in METHODS:
        if os.path.isdir(FLAGS.against):
          with open(os.path.join(FLAGS.against, f'{m}.py')) as f:
            src = f.read()
        else:
          src = subprocess.run(['git', 'show', f'{FLAGS.against}:metal_jax/baselines/{m}.py'],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout
        with open(os.path.join(against_dir, f'{m}.py'), 'w') as f:
          f.write(src)
    runs = {(s, m): [] for s in sides for m in FLAGS.methods}
    for r in range(FLAGS.rounds):
      for m in FLAGS.methods:
        for s in (sides if r % 2 == 0 else sides[::-1]):  # alternate which side goes first
          res = run_worker(s, m, against_dir)
          runs[(s, m)].append(res['records'])
          recs = res['records']
          print(f'round {r + 1}/{FLAGS.rounds} {m} {s}: median '
                f'{statistics.median(x["wall"] for x in recs):.2f} s a task-seed, total '
                f'{sum(x["wall"] for x in recs):.1f} s wall, {sum(x["cpu"] for x in recs):.1f} s '
                f'CPU, {len(recs)} task-seeds, '
                f'{sum(x["compiles"] for x in recs)} compilations '
                f'({sum(x["compile_s"] for x in recs):.1f} s)', flush=True)
  summary = {}
  for m in FLAGS.methods:
    for s in sides:
      recs = [x for rnd in runs[(s, m)] for x in rnd]
      summary[f'{m}/{s}'] = {
          'median_wall_s': statistics.median(x['wall'] for x in recs),
          'median_cpu_s': statistics.median(x['cpu'] for x in recs),
          'median_total_wall_s': statistics.median(sum(x['wall'] for x in rnd)
                                                   for rnd in runs[(s, m)]),
          'median_total_cpu_s': statistics.median(sum(x['cpu'] for x in rnd)
                                                  for rnd in runs[(s, m)]),
          'compilations': statistics.median(sum(x['compiles'] for x in rnd)
                                            for rnd in runs[(s, m)]),
          'compile_s': statistics.median(sum(x['compile_s'] for x in rnd) for rnd in runs[(s, m)]),
          # the mean over task-seeds, as eval.py's cost table (RLPrompt's depends on the classes)
          'forward_passes': statistics.mean(x['forward'] for x in recs),
          'backward_passes': statistics.mean(x['backward'] for x in recs)}
      v = summary[f'{m}/{s}']
      print(f'{m} ({s}): median per task and seed {v["median_wall_s"]:.2f} s wall, '
            f'{v["median_cpu_s"]:.2f} s CPU; total {v["median_total_wall_s"]:.1f} s wall, '
            f'{v["median_total_cpu_s"]:.1f} s CPU, {v["compilations"]:.0f} compilations '
            f'({v["compile_s"]:.1f} s); {v["forward_passes"]:.0f} forward + '
            f'{v["backward_passes"]:.0f} backward passes a task (mean)')
    if FLAGS.against:
      a, b = summary[f'{m}/against'], summary[f'{m}/this']
      diff = max(float(np.max(np.abs(np.asarray(x['prompt']) - np.asarray(y['prompt']))))
                 if len(x['prompt']) == len(y['prompt']) else float('inf')
                 for x, y in zip(runs[('this', m)][0], runs[('against', m)][0]))
      same = sum(x['prompt'] == y['prompt']
                 for x, y in zip(runs[('this', m)][0], runs[('against', m)][0]))
      summary[m] = {'speedup_per_task': a['median_wall_s'] / b['median_wall_s'],
                    'speedup_total': a['median_total_wall_s'] / b['median_total_wall_s'],
                    'speedup_total_cpu': a['median_total_cpu_s'] / b['median_total_cpu_s'],
                    'identical_prompts': same, 'task_seeds': len(runs[('this', m)][0]),
                    'max_prompt_diff': diff}
      c = summary[m]
      print(f'{m}: {FLAGS.against} / this tree: {c["speedup_per_task"]:.2f}x per task and seed, '
            f'{c["speedup_total"]:.2f}x total wall, {c["speedup_total_cpu"]:.2f}x total CPU; '
            f'identical prompts for {same} of {c["task_seeds"]} task-seeds (largest difference '
            f'{diff:.2e})')
  load1 = os.getloadavg()[0]
  print(f'load average (1 min) at start {load0:.2f}, at end {load1:.2f} ({os.cpu_count()} cores)')
  print(f'reproduce: {command}')
  print(json.dumps({'command': command, 'workdir': FLAGS.workdir, 'rounds': FLAGS.rounds,
                    'against': FLAGS.against, 'summary': summary,
                    'load_average_1min': {'start': load0, 'end': load1}}))


if __name__ == '__main__':
  app.run(main)
