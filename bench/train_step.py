"""Times the jitted meta-training step after compilation.

Prints tokens/s, step time, and achieved FLOP/s (XLA's cost analysis of the
compiled step) as a fraction of this machine's matmul peak, measured in the
same run with a large float32 matmul.

  python bench/train_step.py                                  # the default config, its workdir
  python bench/train_step.py --config.batch_size=32 --steps=20
  python bench/train_step.py --config=configs/gpt2_xl_cls2cls.py --config.data_dir=... --config.model=...
  python bench/train_step.py --vs_buckets_per_octave=1    # also padded to powers of two, interleaved

The default config's built-in LM is pretrained (or reused) in --workdir first.
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import configs  # noqa: E402
from metal_jax import experiment, run_train, sharding  # noqa: E402
from metal_jax.data.episodes import EpisodeSampler  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/default.py', 'experiment config')
flags.DEFINE_string('workdir', 'runs/bench', 'where the data / built-in base LM go')
flags.DEFINE_integer('steps', 10, 'timed steps (after one compile step)')
flags.DEFINE_integer('vs_buckets_per_octave', 0,
                     '> 0: also time the same episodes padded with this buckets_per_octave, the '
                     'two steps interleaved (medians and the ratio)')
flags.DEFINE_integer('matmul', 2048, 'size n of the n x n x n float32 matmul that measures peak')
FLAGS = flags.FLAGS


def matmul_peak(n: int, reps: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main(argv):
  del argv
  config = FLAGS.config
  config.setting = configs.setting_path(config.setting)
  workdir = FLAGS.workdir
  run = experiment.setup(config, workdir)
  mesh, lm, pgm_cfg = run.mesh, run.lm, run.pgm_cfg
  sampler = EpisodeSampler(run.tasks, run.spec, config.batch_size, config.seed)
  # The run's own state and jitted step, for the run's own length (train() builds the same).
  trainer = experiment.make_trainer(config, lm.module, mesh, run.param_shardings,
                                    run_train.num_steps(config, sampler))
  state, step = trainer.init(jax.random.key(config.seed)), trainer.step_fn
  rng = jax.random.key(config.seed + 1)

  # One batch shape for every timed step, so only one compilation is measured out.
  local = sampler.batch(0)
  tokens = int(local['pgm_mask'].sum() + local['lm_mask'].sum())
  variants = {config.get('buckets_per_octave', 1): local}
  if FLAGS.vs_buckets_per_octave:  # the same episodes, padded to the other buckets
    spec = dataclasses.replace(run.spec, buckets_per_octave=FLAGS.vs_buckets_per_octave)
    variants[FLAGS.vs_buckets_per_octave] = EpisodeSampler(
        run.tasks, spec, config.batch_size, config.seed).batch(0)
  timed = {}
  for n, loc in variants.items():
    batch = sharding.global_batch(loc, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, lm.params, batch, rng).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    st, m = compiled(trainer.init(jax.random.key(config.seed)), lm.params, batch, rng)
    jax.block_until_ready(m)
    padded = sum(int(np.prod(v.shape)) for k, v in loc.items() if k in ('pgm_ids', 'lm_ids'))
    timed[n] = dict(compiled=compiled, batch=batch, state=st, times=[], compile_s=compile_s,
                    flops=float(cost.get('flops', 0.0)), padded=padded,
                    shape=(loc['pgm_ids'].shape[-1], loc['lm_ids'].shape[-1]))
  for _ in range(FLAGS.steps):  # interleaved: the machine's drift hits every variant alike
    for v in timed.values():
      t = time.perf_counter()
      v['state'], m = v['compiled'](v['state'], lm.params, v['batch'], rng)
      jax.block_until_ready(m)
      v['times'].append(time.perf_counter() - t)
  first = next(iter(timed.values()))
  times, compile_s, flops, padded = first['times'], first['compile_s'], first['flops'], first['padded']
  step_s = float(np.median(times))
  peak = matmul_peak(FLAGS.matmul)
  achieved = flops / step_s
  print(f'command: python bench/train_step.py {" ".join(sys.argv[1:])}')
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')
  print(f'model: {lm.config.model_type} d={lm.config.d_model} L={lm.config.n_layers}; '
        f'design={pgm_cfg.design} P={pgm_cfg.prompt_len} dtype={config.dtype}')
  print(f'batch: {config.batch_size} episodes; PGM {local["pgm_ids"].shape[-1]} + '
        f'LM {local["lm_ids"].shape[-1]} tokens a row; {tokens} real / {padded} padded tokens')
  print(f'compile: {compile_s:.1f} s')
  print(f'step time (median of {FLAGS.steps}): {step_s * 1e3:.1f} ms')
  print(f'tokens/s: {tokens / step_s:,.0f} real, {padded / step_s:,.0f} padded')
  print(f'step FLOPs (XLA cost analysis): {flops / 1e9:.2f} GFLOP -> '
        f'{achieved / 1e9:.1f} GFLOP/s')
  print(f'matmul peak ({FLAGS.matmul}^3 float32): {peak / 1e9:.1f} GFLOP/s -> '
        f'{100 * achieved / peak:.1f}% of peak')
  if len(timed) > 1:
    print('buckets_per_octave | PGM + LM row | padded tokens | compile s | GFLOP | median step ms '
          '| ratio to the first')
    for n, v in timed.items():
      med = float(np.median(v['times']))
      print(f'{n} | {v["shape"][0]} + {v["shape"][1]} | {v["padded"]} | {v["compile_s"]:.1f} | '
            f'{v["flops"] / 1e9:.2f} | {med * 1e3:.1f} | {med / step_s:.2f}')


if __name__ == '__main__':
  app.run(main)
