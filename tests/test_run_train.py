"""run_train.py's pieces beside the loop: run length, parameter counts, the metric writer, the
resume-time metric truncation and the SIGTERM watch. (The loop itself, resume, preemption and the
refused scan_layers resume are end to end in tests/test_training.py, section 6.)"""

from __future__ import annotations

import json
import os
import signal
import types

import numpy as np

from configs import default
from metal_jax import run_train


def test_num_steps_prefers_num_steps_else_epochs_with_at_least_one():
  c = default.get_config()
  sampler = types.SimpleNamespace(episodes_per_epoch=1000)
  c.num_steps, c.epochs, c.batch_size = 7, 3, 16
  assert run_train.num_steps(c, sampler) == 7
  c.num_steps = 0
  assert run_train.num_steps(c, sampler) == 3 * 1000 // 16
  sampler.episodes_per_epoch = 4
  assert run_train.num_steps(c, sampler) == 1


def test_parameter_counts():
  params = {'a': np.zeros((3, 4)), 'b': {'c': np.zeros((5,))}}
  trainable = {'lora': np.zeros((2, 2))}
  assert run_train.parameter_counts(params, trainable) == {
      'frozen': 17, 'trainable': 4, 'trainable_fraction': 4 / 17}


def test_metric_writer_rows_and_resume_truncation(tmp_path):
  w = run_train.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    w.write(step, {'loss': np.float32(step / 10)})
  w.close()
  path = tmp_path / 'metrics.jsonl'
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows == [{'step': 10, 'loss': 1.0}, {'step': 20, 'loss': 2.0}, {'step': 30, 'loss': 3.0}]
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tb'))
  run_train.truncate_metrics(str(tmp_path), 20)  # resumed from step 20: step 30 is rewritten
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [10, 20]
  off = tmp_path / 'off'
  run_train.MetricWriter(str(off), enabled=False).write(1, {'loss': 1.0})  # not process 0
  assert not off.exists()


def test_preemption_watch_flags_sigterm_and_restores_the_handler():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *a: seen.append('outer'))
  try:
    with run_train.PreemptionWatch() as watch:
      assert not watch.signalled
      os.kill(os.getpid(), signal.SIGTERM)
      assert watch.signalled and seen == []
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == ['outer']
  finally:
    signal.signal(signal.SIGTERM, previous)
