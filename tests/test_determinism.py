"""Determinism on one machine (issue 18, item 8): two runs of the built-in default, shortened,
give the same numbers.

train.py (the built-in tiny GPT-2: the suite written, the base LM pretrained, then the PGM
meta-trained) and eval.py run twice as real processes in two workdirs, under different
PYTHONHASHSEEDs (so no set or dict order that depends on string hashing can leak in). The base
LM's pretraining loss curve, the meta-training losses and gradient norms, the generated suite
and the evaluation table must be equal, bit for bit. Between machines XLA:CPU's code generation
differs, and the README says which figures may move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ['--config.tiny_model.n_embd=32', '--config.tiny_model.n_layer=1',
         '--config.tiny_model.n_positions=128', '--config.pretrain.steps=12',
         '--config.pretrain.copy_steps=6', '--config.pretrain.warmup_steps=2',
         '--config.pretrain.decay_steps=12', '--config.pretrain.batch_size=4',
         '--config.pretrain.seq_len=64', '--config.synthetic.n_train_tasks=6',
         '--config.synthetic.n_test_tasks=2', '--config.synthetic.n_train_examples=40',
         '--config.synthetic.n_test_examples=8', '--config.num_steps=4', '--config.batch_size=4',
         '--config.pgm.prompt_len=4', '--config.pgm.lstm_layers=1', '--config.lora.rank=4',
         '--config.log_every=1', '--config.progress=False', '--config.async_checkpoints=False']


def run(workdir: str, hash_seed: str) -> None:
  env = {**os.environ, 'PYTHONHASHSEED': hash_seed,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  for cmd in ([sys.executable, 'train.py', f'--workdir={workdir}'] + SHORT,
              [sys.executable, 'eval.py', f'--workdir={workdir}', '--seeds=100,13',
               '--methods=zero_shot,icl,metal', '--noprogress']):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def outputs(workdir: str) -> dict:
  with open(os.path.join(workdir, 'base_lm', 'pretrain.json')) as f:
    pre = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [(r['step'], r['loss'], r['grad_norm']) for r in map(json.loads, f)]
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    res = json.load(f)
  with open(os.path.join(workdir, 'data', 'setting.json')) as f:
    setting = json.load(f)
  return {'pretrain': pre['losses'], 'steps': steps, 'setting': setting,
          'table': {m: (r['tasks'], r['mean'], r['std_over_seeds'])
                    for m, r in res['methods'].items()}}


def test_two_runs_of_the_shortened_default_give_the_same_numbers(tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  run(a, '1')
  run(b, '2')
  first, second = outputs(a), outputs(b)
  assert len(first['pretrain']) == 3 and len(first['steps']) == 4  # steps 0, 10, 11; 1..4
  assert first['table'].keys() == {'zero_shot', 'icl', 'metal'}
  for k in first:
    assert first[k] == second[k], k
