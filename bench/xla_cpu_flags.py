"""XLA:CPU's dot back ends, measured: which XLA_FLAGS make our step (and its matmuls) fastest.

The pinned jaxlib's XLA:CPU can route dots to YNNPACK (its default here), oneDNN
(--xla_cpu_use_onednn, --xla_cpu_experimental_onednn_fusion_type=dot) or XNNPACK
(--xla_cpu_use_xnnpack). XLA_FLAGS is read once, when jax starts, so every flag set runs
in a process of its own; rounds go over the flag sets in turn (interleaved) and the figures
are medians over rounds (--repeats). Two measurements:

  dots   GFLOP/s of a jitted matmul at the shapes of the GPT-2-small step (the PGM's rows x
         768 against each weight, forward and backward layouts), float32 and bfloat16, and
         torch.matmul (oneDNN/MKL) on the same shapes in the same round;
  step   the Eq.1 training step of bench/vs_pytorch.py (same model, batch and step),
         milliseconds, with its loss (it must not move with the flags).

  python bench/xla_cpu_flags.py                          # dots, then the tiny step
  python bench/xla_cpu_flags.py --what=step --step_shape=gpt2-small --repeats=3 --steps=3
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAG_SETS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'onednn_fusion': '--xla_cpu_experimental_onednn_fusion_type=dot',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
}
# (M, K, N) of the GPT-2-small step's matmuls: 4 x 276 PGM tokens against c_attn, c_fc, c_proj
# (forward), and the backward's input-gradient and weight-layout variants.
SHAPES = [(1104, 768, 2304), (1104, 768, 3072), (1104, 3072, 768), (1104, 2304, 768),
          (768, 1104, 2304)]

flags.DEFINE_enum('what', 'both', ['dots', 'step', 'both'], 'what to measure')
flags.DEFINE_list('sets', list(FLAG_SETS), f'flag sets to compare: {list(FLAG_SETS)}')
flags.DEFINE_enum('step_shape', 'tiny', ['tiny', 'gpt2-small'],
                  'the step shape (bench/vs_pytorch.py)')
flags.DEFINE_enum('step_dtype', 'float32', ['float32', 'bfloat16'], 'the step\'s compute dtype')
flags.DEFINE_integer('repeats', 3, 'interleaved rounds')
flags.DEFINE_integer('steps', 10, 'timed steps a process (after one untimed)')
flags.DEFINE_string('child', '', 'internal: run one measurement in this process')
FLAGS = flags.FLAGS


def _median_s(fn, n):
  fn()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def child_dots() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  out = {}
  for dtype in ('float32', 'bfloat16'):
    for m, k, n in SHAPES:
      rng = np.random.default_rng(0)
      a = jnp.asarray(rng.normal(size=(m, k)), dtype)
      b = jnp.asarray(rng.normal(size=(k, n)), dtype)
      f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
      s = _median_s(lambda: f(a, b).block_until_ready(), 10)
      out[f'{dtype} {m}x{k}x{n}'] = 2 * m * k * n / s / 1e9
  return out


def child_torch_dots() -> dict:
  import numpy as np
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    for m, k, n in SHAPES:
      rng = np.random.default_rng(0)
      a = torch.tensor(rng.normal(size=(m, k)), dtype=getattr(torch, dtype))
      b = torch.tensor(rng.normal(size=(k, n)), dtype=getattr(torch, dtype))
      s = _median_s(lambda: a @ b, 10)
      out[f'{dtype} {m}x{k}x{n}'] = 2 * m * k * n / s / 1e9
  return out


def child_step(shape: str, dtype: str, steps: int) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import vs_pytorch as V
  V.FLAGS(['vs_pytorch', f'--dtype={dtype}'])
  side = V.build_jax(V.SHAPES[shape], dtype, V.random_batch(V.SHAPES[shape], 0), 0)
  loss = float(side.run()['loss'])
  return {'step_ms': 1e3 * _median_s(side.run, steps), 'first_loss': loss,
          'compile_s': side.compile_s}


def run_child(kind: str, xla_flags: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={kind}',
         f'--step_shape={FLAGS.step_shape}', f'--step_dtype={FLAGS.step_dtype}',
         f'--steps={FLAGS.steps}']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    return {'error': proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child:
    step = lambda: child_step(FLAGS.step_shape, FLAGS.step_dtype, FLAGS.steps)
    out = {'dots': child_dots, 'torch_dots': child_torch_dots, 'step': step}[FLAGS.child]()
    print(json.dumps(out))
    return
  unknown = [s for s in FLAGS.sets if s not in FLAG_SETS]
  if unknown:
    sys.exit(f'--sets: unknown {unknown}; choose from {list(FLAG_SETS)}')
  kinds = {'dots': ['dots'], 'step': ['step'], 'both': ['dots', 'step']}[FLAGS.what]
  rows: dict = {}
  for r in range(FLAGS.repeats):
    for kind in kinds:
      if kind == 'dots':
        rows.setdefault(('torch', 'dots'), []).append(run_child('torch_dots', ''))
      for name in FLAGS.sets:
        res = run_child(kind, FLAG_SETS[name])
        rows.setdefault((name, kind), []).append(res)
        print(f'round {r + 1} {kind} {name}: {json.dumps(res)}', flush=True)
  summary = {}
  for (name, kind), results in rows.items():
    ok = [x for x in results if 'error' not in x]
    if not ok:
      summary[f'{name} {kind}'] = {'error': results[0]['error']}
      continue
    summary[f'{name} {kind}'] = {k: statistics.median(x[k] for x in ok) for k in ok[0]}
  print('\nmedians over rounds:')
  for key, val in summary.items():
    print(f'  {key}: {json.dumps(val)}')
  if 'default step' in summary and 'step_ms' in summary['default step']:
    base = summary['default step']['step_ms']
    for name in FLAG_SETS:
      if 'step_ms' in summary.get(f'{name} step', {}):
        print(f'  step speedup of {name} over default: '
              f'{base / summary[f"{name} step"]["step_ms"]:.3f}x')
  print(f'command: python bench/xla_cpu_flags.py {" ".join(sys.argv[1:])}')
  print(f'load average at the end: {os.getloadavg()[0]:.2f}')
  print(json.dumps({'command': 'python bench/xla_cpu_flags.py ' + ' '.join(sys.argv[1:]),
                    'flag_sets': {n: FLAG_SETS[n] for n in FLAGS.sets}, 'medians': summary}))


if __name__ == '__main__':
  app.run(main)
