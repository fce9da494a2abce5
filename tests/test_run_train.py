"""run_train.py's pieces beside the loop: run length, parameter counts, the metric writer, the
resume-time metric truncation, the SIGTERM watch, what the prefetch thread computes for a step and
the loop-only config fields. (The loop itself, resume, preemption and the refused scan_layers
resume are end to end in tests/test_training.py, section 6.)"""

from __future__ import annotations

import json
import os
import signal
import types

import ml_collections
import numpy as np
import pytest

from configs import default
from metal_jax import experiment, run_train, sharding, training
from metal_jax.data.episodes import EpisodeSampler, EpisodeSpec
from metal_jax.data.tasks import TokenizedTask


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


def tiny_sampler(batch_size: int) -> EpisodeSampler:
  """A sampler over two in-memory tasks of random token ids."""
  rng = np.random.default_rng(0)
  ids = lambda lo, hi: rng.integers(3, 90, rng.integers(lo, hi)).tolist()
  tasks = []
  for t in range(2):
    n = 12
    cols = {'input_first': [ids(2, 9) for _ in range(n)],
            'input_rest': [ids(3, 10) for _ in range(n)],
            'output_ids': [ids(1, 3) for _ in range(n)], 'option_ids': [[] for _ in range(n)],
            'answer': [-1] * n, 'input': [''] * n, 'output': [''] * n, 'options': [[]] * n}
    tasks.append(TokenizedTask(f'/data/t{t}/t{t}_16384_100_train.jsonl', cols))
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=1, prompt_len=4, max_len=64)
  return EpisodeSampler(tasks, spec, batch_size, seed=3)


def test_batch_loader_gives_the_samplers_batch_on_the_mesh():
  """What the prefetch thread computes for a step: the sampler's batch of that step, and the same
  rows split over data x fsdp of the mesh (8 fake devices), without moving the sampler's state."""
  sampler = tiny_sampler(batch_size=8)
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  local, batch = run_train.batch_loader(sampler, mesh)(5)
  want = sampler.batch(5)
  assert set(local) == set(batch) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(local[k], v)
    np.testing.assert_array_equal(np.asarray(batch[k]), v)
    assert batch[k].sharding.is_equivalent_to(sharding.batch_sharding(mesh), v.ndim), k
    assert len(batch[k].addressable_shards) == 8
  assert sampler.step == 0
  assert not np.array_equal(sampler.batch(4)['lm_ids'], want['lm_ids'])  # the step matters


def test_prefetch_may_change_on_resume_and_checkpoints_from_before_it_resume():
  """prefetch changes how batches reach the step, not which: a run may resume with another value,
  or from a checkpoint whose config predates the field; other changes are still refused."""
  saved = json.loads(default.get_config().to_json_best_effort())
  before_field = {k: v for k, v in saved.items() if k != 'prefetch'}
  for prefetch in (0, 2, 8):
    training.check_resume_config(before_field, {**saved, 'prefetch': prefetch}, '/ckpt')
    training.check_resume_config(saved, {**saved, 'prefetch': prefetch}, '/ckpt')
  with pytest.raises(training.ResumeError, match=rf'/ckpt: .*num_steps \({saved["num_steps"]} -> 1\)'):
    training.check_resume_config(before_field, {**saved, 'num_steps': 1}, '/ckpt')


def test_checkpoints_from_before_added_fields_resume_as_they_were_trained():
  """A config saved before prompt_chunks, queries_per_episode or buckets_per_octave existed
  meant 1 for each: it resumes under 1, is refused under another value (except the padding's
  buckets_per_octave, which changes no number), and is run with 1."""
  saved = json.loads(default.get_config().to_json_best_effort())
  old = {k: v for k, v in saved.items() if k not in training.ADDED_FIELDS}
  now = {**saved, 'prompt_chunks': 1, 'queries_per_episode': 1, 'buckets_per_octave': 4}
  training.check_resume_config(old, now, '/ckpt')
  for field in ('prompt_chunks', 'queries_per_episode'):
    with pytest.raises(training.ResumeError, match=rf'{field} \(1 -> 2\)'):
      training.check_resume_config(old, {**now, field: 2}, '/ckpt')
  spec = experiment.episode_spec(ml_collections.ConfigDict(old), types.SimpleNamespace(max_len=256))
  assert (spec.prompt_chunks, spec.queries, spec.buckets_per_octave) == (1, 1, 1)


def test_negative_prefetch_is_refused_up_front(tmp_path):
  c = default.get_config()
  c.prefetch = -1
  with pytest.raises(ValueError, match=r'--config\.prefetch=-1: must be >= 0'):
    run_train.train(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()  # refused before anything is written
