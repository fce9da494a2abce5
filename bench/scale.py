"""A paper-scale meta-training step by compilation alone: no weights, no accelerator.

Builds the config's model from its shape (a local checkpoint's config.json, else the
known shape of its hub id: metal_jax/scale.py), lowers and compiles train.py's own step
for a mesh of --devices fake CPU devices on a batch at the paper's shapes (16 episodes,
X^P filling the 1,024-token limit), and prints what XLA reports per device (memory,
FLOPs, bytes, collectives), the step projected onto named accelerators, and the paper
run's projected wall time. Nothing is allocated but the compiler's own memory.

  python bench/scale.py --config=configs/gpt2_xl_cls2cls.py --devices=1
  python bench/scale.py --config=configs/llama2_7b_cls2cls.py --devices=8
  python bench/scale.py --config=configs/llama2_7b_cls2cls.py --devices=8 --remat_sweep
  python bench/scale.py --config=configs/gpt2_xl_cls2cls.py --config.model=/path/to/gpt2-xl

XLA:CPU computes bfloat16 in float32, so its memory is an upper bound for a bf16
accelerator. --topology compiles for a TPU slice instead, with XLA's own TPU compiler
(ahead of time, no TPU; libtpu must be importable):
  PYTHONPATH=/path/to/libtpu python bench/scale.py --config=configs/llama2_7b_cls2cls.py \
      --topology=v5e:2x4
"""

import os
import sys


def _devices_from_argv(argv, default=1) -> int:
  """--devices, read before absl parses flags: XLA_FLAGS must be set before jax is imported."""
  for i, a in enumerate(argv):
    if a.startswith('--devices='):
      return int(a.split('=', 1)[1])
    if a == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return default


os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_'
                           f'count={_devices_from_argv(sys.argv)}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datetime  # noqa: E402
import resource  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import configs  # noqa: E402
from metal_jax import scale  # noqa: E402
from metal_jax.models.layers import REMAT_POLICIES  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/default.py', 'experiment config')
flags.DEFINE_integer('devices', 1, 'fake CPU devices the mesh (--config.mesh) spans')
flags.DEFINE_integer('train_examples', 0,
                     'meta-train examples of the run; 0 = max_examples_per_task (the paper: '
                     '16,384) x the setting\'s meta-train tasks, an upper bound')
flags.DEFINE_integer('lm_len', 0, 'tokens of the LM half (X^L, x, y), bucketed; 0 = the largest '
                     'bucket the episode spec allows (max_len - prompt_len)')
flags.DEFINE_float('mfu', scale.DEFAULT_MFU, 'model FLOPs utilisation of the projected step')
flags.DEFINE_bool('correct_loops', True, 'count every trip of a scanned layer stack (compiles '
                  'the unrolled model at 1 and 2 layers); off: cost_analysis() as reported')
flags.DEFINE_string('topology', '', 'compile for this TPU slice instead (e.g. v5e:2x4, a v5e-8): '
                    'XLA\'s TPU compiler, no TPU; needs libtpu importable (jax[tpu]\'s version, '
                    'e.g. pip install --target DIR "libtpu==0.0.42.*" and PYTHONPATH=DIR)')
flags.DEFINE_string('dump_hlo', '', 'write the compiled step\'s HLO text to this file')
flags.DEFINE_bool('remat_sweep', False, 'compile every --config.remat policy and tabulate memory '
                  'and FLOPs')
FLAGS = flags.FLAGS


def gib(b: float) -> str:
  return f'{b / scale.GiB:.2f}'


def print_table(header: list[str], rows: list[list]) -> None:
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in rows:
    print('| ' + ' | '.join(str(x) for x in r) + ' |')


def train_examples(config) -> tuple[int, str]:
  if FLAGS.train_examples:
    return FLAGS.train_examples, '--train_examples'
  if not config.data_dir and not config.setting:  # the built-in synthetic suite
    s = config.synthetic
    n = s.n_train_tasks * min(s.n_train_examples, config.max_examples_per_task)
    return n, f'the synthetic suite: {s.n_train_tasks} tasks x {s.n_train_examples} examples'
  n, tasks = scale.default_train_examples(config)
  return n, (f'upper bound: {config.max_examples_per_task:,} examples x {tasks} meta-train tasks '
             f'of {os.path.basename(config.setting)}')


def main(argv):
  del argv
  config = FLAGS.config
  config.setting = configs.setting_path(config.setting)
  if not FLAGS.topology and jax.device_count() != FLAGS.devices:
    raise SystemExit(f'--devices={FLAGS.devices}, but jax sees {jax.device_count()} devices '
                     f'(XLA_FLAGS={os.environ.get("XLA_FLAGS")!r})')
  r = scale.analyze(config, FLAGS.devices, topology=FLAGS.topology, lm_len=FLAGS.lm_len,
                    correct_loops=FLAGS.correct_loops, keep_hlo=bool(FLAGS.dump_hlo))
  if FLAGS.dump_hlo:
    with open(FLAGS.dump_hlo, 'w') as f:
      f.write(r.hlo_text)
  m = r.model
  n_examples, examples_from = train_examples(config)
  per_episode = config.n_prompt_examples + config.n_lm_examples + 1
  steps = scale.run_steps(config.epochs, n_examples, per_episode, config.batch_size)
  if config.num_steps:
    steps = config.num_steps
  proj = scale.project(r, steps, FLAGS.mfu)

  print(f'command: python bench/scale.py {" ".join(sys.argv[1:])}')
  print(f'date: {datetime.date.today().isoformat()}; jax {jax.__version__}')
  where = (f'the {r.devices} chips of a TPU {FLAGS.topology} slice (compile-only)'
           if FLAGS.topology else f'{r.devices} fake CPU devices')
  print(f'devices: {where}; mesh {r.mesh}')
  print(f'model: {m["name"]} ({m["model_type"]}, d={m["d_model"]}, L={m["n_layers"]}, heads '
        f'{m["n_heads"]}/{m["n_kv_heads"]} kv, vocab {m["vocab_size"]:,}); frozen '
        f'{m["frozen_params"] / 1e9:.3f}B params ({m["param_dtype"]}), trainable '
        f'{m["trainable_params"] / 1e6:.1f}M (float32); compute {m["dtype"]}, scan_layers='
        f'{m["scan_layers"]}, remat={m["remat"]}')
  print(f'batch: {config.batch_size} episodes; ' +
        ', '.join(f'{k} {v[0]} {v[1]}' for k, v in r.batch.items()))
  lm_tokens = r.batch['lm_ids'][0][1]
  reachable = (config.n_lm_examples + 1) * config.max_example_len
  if reachable < lm_tokens:
    print(f'LM half: {lm_tokens} tokens, the largest bucket the episode spec allows; an episode '
          f'of n_L={config.n_lm_examples} holds at most (n_L + 1) x max_example_len = {reachable} '
          f'(--lm_len={reachable})')
  print(f'lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s, loop correction and model FLOPs '
        f'{r.correction_s:.1f} s')
  if config.dtype == 'bfloat16' and r.platform == 'cpu':
    print('note: XLA:CPU computes in float32 what it is given in bfloat16 (the compiled HLO '
          'gathers and multiplies float32 copies of the bf16 weights), so temporaries, bytes '
          'accessed and all-gather bytes are upper bounds for a bf16 accelerator')
  print()
  print('Per device, from compiled.memory_analysis() (GiB):')
  mem = r.memory
  print_table(['arguments', 'outputs', 'aliased (donated state)', 'temporaries', 'generated code',
               'total'], [[gib(mem['argument']), gib(mem['output']), gib(mem['alias']),
                           gib(mem['temp']), gib(mem['generated_code']), gib(mem['total'])]])
  print()
  print('Per device, from the shardings (GiB):')
  k = r.by_kind
  print_table(['frozen params', 'trainable', 'optimizer state', 'batch'],
              [[gib(k['frozen_params']), gib(k['trainable']), gib(k['opt_state']),
                gib(k['batch'])]])
  print()
  print(f'Per device, per step (compiled.cost_analysis()): {r.flops / 1e9:,.1f} GFLOP, '
        f'{r.bytes_accessed / 1e9:,.1f} GB accessed'
        + (f' (as reported, a scanned stack counted once: {r.flops_reported / 1e9:,.1f} GFLOP, '
           f'{r.bytes_reported / 1e9:,.1f} GB)' if r.flops != r.flops_reported else '')
        + (' (--nocorrect_loops: a scanned stack counted once)'
           if not FLAGS.correct_loops and config.scan_layers else '')
        + f'; model FLOPs (no remat) {r.model_flops / 1e9:,.1f} GFLOP')
  print()
  print('Collectives in the compiled HLO (result bytes; per step: loop trip counts applied):')
  rows = [[kind, int(c['count']), gib(c['bytes']), int(c['executed']), gib(c['executed_bytes'])]
          for kind, c in r.collectives.items()]
  print_table(['collective', 'in the HLO', 'GiB', 'executed per step', 'GiB per step'], rows)
  unknown = sum(c['unknown_trips'] for c in r.collectives.values())
  if unknown:
    print(f'({unknown} of them sit in loops of unknown trip count, counted once: the per-step '
          'figures are lower bounds)')
  print()
  print(f'Projected step on {r.devices} device(s) of each kind (roofline: max(FLOPs / peak, '
        f'bytes / bandwidth) of the compiled step; at {FLAGS.mfu:.0%} MFU: model FLOPs / '
        f'({FLAGS.mfu:.0%} x peak)):')
  rows = []
  for name, p in proj.items():
    acc = scale.ACCELERATORS[name]
    rows.append([name, f'{acc.peak_flops / 1e12:.0f}', f'{acc.hbm_bandwidth / 1e9:,.0f}',
                 gib(acc.hbm_bytes), 'yes' if p['fits'] else 'NO', f'{p["roofline_s"]:.3f}',
                 f'{p["step_s"]:.3f}', f'{p["run_hours"]:,.1f}'])
  print_table(['accelerator', 'peak TFLOP/s', 'HBM GB/s', 'HBM GiB', 'fits', 'roofline s',
               f'step s at {FLAGS.mfu:.0%} MFU', 'run hours'], rows)
  print()
  if config.num_steps:
    print(f'Run: --config.num_steps={steps:,} steps')
  else:
    print(f'Run: {config.epochs} epochs x {n_examples:,} meta-train examples ({examples_from}) '
          f'/ {per_episode} examples an episode / batch {config.batch_size} = {steps:,} steps '
          '(train.py\'s run length, run_train.num_steps; an upper bound on the paper\'s run)')
  extra = {}
  if FLAGS.remat_sweep:
    print()
    print('Remat policies (--config.remat), per device:')
    rows, sweep = [], {}
    for policy in REMAT_POLICIES:
      c = config.copy_and_resolve_references()
      c.remat = policy
      s = r if policy == r.model['remat'] else scale.analyze(
          c, FLAGS.devices, topology=FLAGS.topology, lm_len=FLAGS.lm_len,
          correct_loops=FLAGS.correct_loops, with_model_flops=False)
      sweep[policy] = dict(total_bytes=s.memory['total'], temp_bytes=s.memory['temp'],
                           flops=s.flops, bytes_accessed=s.bytes_accessed, compile_s=s.compile_s)
      rows.append([policy, gib(s.memory['total']), gib(s.memory['temp']),
                   f'{s.flops / 1e9:,.1f}', f'{s.flops / r.model_flops:.2f}',
                   f'{s.bytes_accessed / 1e9:,.1f}', f'{s.compile_s:.0f}'])
    print_table(['remat', 'total GiB', 'temporaries GiB', 'GFLOP', 'x model FLOPs',
                 'GB accessed', 'compile s'], rows)
    extra['remat_sweep'] = sweep
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print()
  print(f'peak host RSS: {rss / 1e9:.1f} GB')
  print(scale.summary_json(r, proj, steps=steps, train_examples=n_examples, mfu=FLAGS.mfu,
                           model_flops_per_step=r.model_flops, peak_host_rss_bytes=rss,
                           command='python bench/scale.py ' + ' '.join(sys.argv[1:]),
                           date=datetime.date.today().isoformat(), **extra))


if __name__ == '__main__':
  app.run(main)
