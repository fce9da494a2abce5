"""No run lost or poisoned by a bad input or a fault (issue 17), on tiny train.py runs.

* a non-finite step (a batch with an out-of-vocabulary id: NaN embeddings, NaN loss) stops the
  run with DivergenceError naming the step and the last good checkpoint; nothing non-finite is
  saved and keep-N keeps the newest finite checkpoint;
* with skip_nonfinite_steps the step is not applied (state bit for bit as before it), counted
  in metrics.jsonl and the checkpoint, and the run completes;
* eval refuses non-finite option scores (NonFiniteScores naming method, task and seed);
* checkpoints carry sha256 checksums: flipped bytes in a data file, a truncated metadata file, a
  removed item are detected at resume (a warning naming the path) and the newest intact older
  checkpoint is used; the broken newer ones are set aside and written again; eval's
  restore_config / restore_trainable fall back the same way; none intact: one ResumeError;
* a partial last line of metrics.jsonl is dropped with a warning and the run resumes;
* a checkpoint with non-finite values is refused by restore_trainable (naming step and path)
  and skipped at resume.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_run_config, tiny_run_model
from metal_jax import evaluation, experiment, methods, run_train, training
from metal_jax.data.episodes import EpisodeSampler, EpisodeSpec
from metal_jax.data.tasks import TokenizedTask
from metal_jax.models import config_from_hf
from metal_jax.models.hf import read_hf_config

STEPS = 6


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return tiny_run_model(tmp_path_factory.mktemp('model'))


def run_config(model_dir, **fields):
  c = tiny_run_config(model_dir)
  c.batch_size = 8  # one episode a fake device
  c.num_steps = STEPS
  c.save_every = 2
  c.keep_checkpoints = None  # (set per test)
  c.log_every = 1
  for k, v in fields.items():
    c[k] = v
  return c


def poison(monkeypatch, steps):
  """The batches of `steps` (1-based train steps) get out-of-vocabulary token ids: the embedding
  lookup fills NaN, so the loss and the gradient are NaN (a bad input)."""
  batch = EpisodeSampler.batch

  def poisoned(self, step):
    b = batch(self, step)
    if step + 1 in steps:
      b = {**b, 'lm_ids': np.full_like(b['lm_ids'], 10 ** 6)}
    return b

  monkeypatch.setattr(EpisodeSampler, 'batch', poisoned)


def ckpt_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(ckpt_dir(workdir)) if d.isdigit())


def restore_all(workdir, step):
  """(trainable, opt_state, data) of a checkpoint, as numpy (no shapes needed)."""
  mngr = training.checkpoint_manager(ckpt_dir(workdir), read_only=True)
  r = mngr.restore(step, args=training.ocp.args.Composite(
      trainable=training.ocp.args.StandardRestore(),
      opt_state=training.ocp.args.StandardRestore(), data=training.ocp.args.JsonRestore()))
  mngr.close()
  return jax.tree.map(np.asarray, r['trainable']), r['opt_state'], r['data']


def finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def lm_and_pgm(c):
  return config_from_hf(read_hf_config(c.model)), experiment.pgm_config(c)


# ----------------------------------------------------------------------------- 1. divergence


def test_nonfinite_step_stops_without_saving_it(model_dir, tmp_path, monkeypatch):
  """NaN from step 5 (saves every step, keep 2): the run stops at step 5 naming it and the last
  good checkpoint (4); checkpoints 3 and 4 stay, finite and verified; none of step >= 5."""
  c = run_config(model_dir, save_every=1, keep_checkpoints=2, log_every=100,
                 async_checkpoints=True)
  poison(monkeypatch, {5, 6})
  w = str(tmp_path / 'w')
  with pytest.raises(training.DivergenceError,
                     match=r'non-finite loss or gradient at step 5;.*last good checkpoint is '
                           r'step 4 in ' + ckpt_dir(w)) as e:
    run_train.train(c, w)
  assert e.value.step == 5 and e.value.last_good == 4
  assert '\n' not in str(e.value)  # one line: train.py prints it without a traceback
  assert isinstance(e.value, ValueError)
  assert steps_on_disk(w) == [3, 4]  # keep-N saw finite checkpoints only
  for s in (3, 4):
    assert training.verify_checkpoint(ckpt_dir(w), s)
    trainable, opt_state, _ = restore_all(w, s)
    assert finite(trainable) and finite(opt_state)


def test_nonfinite_found_at_a_log_step_names_the_first_bad_step(model_dir, tmp_path,
                                                                monkeypatch):
  """Flags are read only when the host reads anyway (here a log step every 3, saves every 4):
  the error still names the first non-finite step, and the save after it never happens."""
  c = run_config(model_dir, save_every=4, log_every=3, num_steps=8)
  poison(monkeypatch, {2})
  w = str(tmp_path / 'w')
  with pytest.raises(training.DivergenceError,
                     match=r'at step 2 \(seen at step 3\);.*last good checkpoint is step 1'):
    run_train.train(c, w)
  assert steps_on_disk(w) == [1]  # Orbax's first save; not 4
  assert not os.path.exists(os.path.join(w, 'metrics.jsonl'))  # (step 3's row not written)


def test_skip_nonfinite_steps_skips_and_counts(model_dir, tmp_path, monkeypatch, caplog):
  c = run_config(model_dir, save_every=1, skip_nonfinite_steps=True)
  poison(monkeypatch, {4})
  w = str(tmp_path / 'w')
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    out = run_train.train(c, w)
  assert 'skipped 1 non-finite step(s) (their updates not applied): 4; 1 so far' in caplog.text
  rows = read_metrics(w)
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  assert [r['skipped_steps'] for r in rows] == [0, 0, 0, 1, 1, 1]
  assert np.isnan(rows[3]['loss']) and all(np.isfinite(r['loss']) for i, r in enumerate(rows)
                                           if i != 3)
  assert out['last']['skipped_steps'] == 1
  assert steps_on_disk(w) == list(range(1, STEPS + 1))
  t3, o3, _ = restore_all(w, 3)
  t4, o4, d4 = restore_all(w, 4)
  t5, _, _ = restore_all(w, 5)
  jax.tree.map(np.testing.assert_array_equal, t4, t3)  # step 4 not applied, bit for bit
  jax.tree.map(np.testing.assert_array_equal, o4, o3)
  assert d4['step'] == 4 and d4['nonfinite_skipped'] == 1  # the data moved on; the count saved
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(t5), jax.tree.leaves(t4))) > 0
  assert finite(t5)


def test_skip_option_is_a_resumable_change():
  saved = json.loads(run_config('m').to_json_best_effort())
  training.check_resume_config(saved, {**saved, 'skip_nonfinite_steps': True}, '/ckpt')


# ----------------------------------------------------------------------------- 2. eval


def tiny_task(path, n=3):
  cols = {'input_first': [[5, 6]] * n, 'input_rest': [[7]] * n, 'output_ids': [[8]] * n,
          'option_ids': [[[8], [9]]] * n, 'answer': [0] * n, 'input': ['x'] * n,
          'output': ['a'] * n, 'options': [['a', 'b']] * n}
  return TokenizedTask(path, cols)


def test_predict_refuses_nonfinite_scores():
  q = tiny_task('/data/t/t_16_13_test.jsonl')
  ok = [np.array([1.0, 2.0]), np.array([3.0, 0.5]), np.array([1.0, 1.5])]
  assert evaluation.predict(ok, q) == ['a', 'b', 'a']
  for bad in (np.nan, np.inf, -np.inf):
    scores = [ok[0], np.array([bad, 2.0]), ok[2]]
    with pytest.raises(evaluation.NonFiniteScores,
                       match=r'method metal, task t, seed 13: 1 of 3 queries have non-finite'):
      evaluation.predict(scores, q, method='metal', task='t', seed=13)


def test_evaluate_refuses_nonfinite_scores_naming_method_task_seed(tmp_path, monkeypatch):
  """evaluate() on NaN scores (a diverged PGM's): an error naming the method, task and seed; no
  F1 and no predictions file."""
  seeds = [evaluation.TaskSeed(t, 21, tiny_task(f'/d/{t}_train.jsonl', 16),
                               tiny_task(f'/d/{t}_test.jsonl')) for t in ('ta', 'tb')]
  calls = []

  def nan_scores(module, params, jobs, rows=32):
    calls.append(len(jobs))
    return [[np.array([np.nan, 1.0]) if t == 1 else np.array([0.5, 1.0])
             for t in range(len(j.queries))] for j in jobs]

  monkeypatch.setattr(evaluation, 'score_tasks', nan_scores)
  lm = types.SimpleNamespace(module=None, params=None)
  spec = EpisodeSpec(n_prompt_examples=16, prompt_len=4, max_len=128)
  out = str(tmp_path / 'out')
  with pytest.raises(evaluation.NonFiniteScores,
                     match=r'^method zero_shot, task ta, seed 21: 1 of 3 queries'):
    evaluation.evaluate(lm, None, None, seeds, spec,
                        [('zero_shot', methods.REGISTRY['zero_shot'], methods.NoHparams())],
                        (16, 0), out, progress=False)
  assert calls == [1]  # the first (method, task): its one seed; stopped there
  assert not glob.glob(os.path.join(out, '**', '*.jsonl'), recursive=True)


# ------------------------------------------------------------------------ 3. broken checkpoints


@pytest.fixture(scope='module')
def base_run(model_dir, tmp_path_factory):
  """A finished tiny run: checkpoints 1 (Orbax's first save), 2, 4, 6, all with checksums."""
  w = str(tmp_path_factory.mktemp('base'))
  run_train.train(run_config(model_dir), w)
  assert steps_on_disk(w) == [1, 2, 4, 6]
  assert all(training.verify_checkpoint(ckpt_dir(w), s) for s in (1, 2, 4, 6))
  return w


def copy_run(base, tmp_path):
  w = str(tmp_path / 'w')
  shutil.copytree(base, w)
  return w


def data_file(workdir, step, item='trainable'):
  """The biggest array data file of an item (not metadata)."""
  files = [f for f in glob.glob(os.path.join(ckpt_dir(workdir), str(step), item, '**', 'd', '*'),
                                recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def flip_bytes(path, n=64):
  data = bytearray(open(path, 'rb').read())
  mid = len(data) // 2
  data[mid:mid + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
  open(path, 'wb').write(bytes(data))


def truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def test_flipped_bytes_are_detected_and_the_older_checkpoint_resumes(model_dir, base_run,
                                                                      tmp_path, caplog):
  """The user's fault: 64 random bytes in the newest checkpoint's data file (and a run killed
  mid-write of metrics.jsonl). Eval falls back to step 4, naming the file; resuming warns,
  restores step 4, sets 6 aside, trains steps 5-6 again and writes a verified step 6."""
  c = run_config(model_dir)
  w = copy_run(base_run, tmp_path)
  bad = data_file(w, 6)
  flip_bytes(bad)
  with open(os.path.join(w, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 7, "loss": 1.2')  # killed mid-write
  with pytest.raises(training.CheckpointIntegrityError, match=rf'{bad}: checkpoint step 6: '
                                                              'contents differ'):
    training.verify_checkpoint(ckpt_dir(w), 6)

  lm_cfg, pgm_cfg = lm_and_pgm(c)
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    cfg, step = training.restore_config(w)
    trainable, step_t = training.restore_trainable(w, lm_cfg, pgm_cfg)
  assert step == step_t == 4 and cfg['num_steps'] == STEPS
  assert caplog.text.count(f'{bad}: checkpoint step 6: contents differ') == 2
  with pytest.raises(training.CheckpointIntegrityError, match=rf'{bad}: checkpoint step 6'):
    training.restore_trainable(w, lm_cfg, pgm_cfg, step=6)  # asked for: refused, not replaced

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    out = run_train.train(c, w)
  assert f'{bad}: checkpoint step 6: contents differ' in caplog.text
  assert 'metrics.jsonl: dropped 1 unreadable line(s)' in caplog.text
  assert f'moved the broken checkpoint step 6 to {ckpt_dir(w)}.broken/6' in caplog.text
  assert out['last']['loss'] == pytest.approx(read_metrics(base_run)[-1]['loss'], rel=1e-5)
  assert [r['step'] for r in read_metrics(w)] == list(range(1, STEPS + 1))
  assert steps_on_disk(w) == [1, 2, 4, 6]
  assert training.verify_checkpoint(ckpt_dir(w), 6)
  assert os.path.isdir(os.path.join(ckpt_dir(w) + '.broken', '6'))  # kept for a look
  t_new, _ = training.restore_trainable(w, lm_cfg, pgm_cfg)
  t_base, _ = training.restore_trainable(base_run, lm_cfg, pgm_cfg)
  for a, b in zip(jax.tree.leaves(t_new), jax.tree.leaves(t_base)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('damage', ['config/metadata', 'trainable/_METADATA', 'data/metadata',
                                    'rm trainable', 'unverified: truncated trainable data'])
def test_truncated_or_missing_item_resumes_from_the_older_checkpoint(model_dir, base_run,
                                                                       tmp_path, caplog, damage):
  """A truncated metadata file or a removed item of the newest checkpoint (found by its
  checksums), or, in a checkpoint without checksums (an older metal-jax's), a truncated data file
  (found when it fails to restore): resuming (stop_at=4, so nothing is compiled) warns naming the
  path and step and restores step 4."""
  c = run_config(model_dir, stop_at=4)
  w = copy_run(base_run, tmp_path)
  six = os.path.join(ckpt_dir(w), '6')
  if damage.startswith('unverified'):
    os.remove(os.path.join(six, training.CHECKSUMS))
    truncate(data_file(w, 6))
    where = f'{six}: checkpoint step 6 does not restore: '
  elif damage.startswith('rm '):
    shutil.rmtree(os.path.join(six, 'trainable'))
    where = f'{six}/trainable/'
  else:
    truncate(os.path.join(six, damage))
    where = f'{six}/{damage}: checkpoint step 6: '
  with caplog.at_level(logging.INFO, logger='metal_jax'):
    run_train.train(c, w)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(m.startswith(f'broken checkpoint, trying the next older one: {where}')
             for m in warned), warned
  assert f'resuming from the checkpoint at step 4 in {ckpt_dir(w)}' in caplog.text
  assert steps_on_disk(w) == [1, 2, 4]  # 6 set aside (rewritten when the run goes on)
  assert [r['step'] for r in read_metrics(w)] == [1, 2, 3, 4]


def test_checkpoint_without_checksums_is_used_with_a_warning(model_dir, base_run, tmp_path,
                                                              caplog):
  """A checkpoint of an older metal-jax (no checksums file): used, with a warning; its metadata
  are still checked to parse."""
  w = copy_run(base_run, tmp_path)
  os.remove(os.path.join(ckpt_dir(w), '6', training.CHECKSUMS))
  assert training.verify_checkpoint(ckpt_dir(w), 6) is False
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    _, step = training.restore_config(w)
  assert step == 6 and 'checkpoint step 6 has no checksums' in caplog.text
  truncate(os.path.join(ckpt_dir(w), '6', 'trainable', '_METADATA'))
  with pytest.raises(training.CheckpointIntegrityError, match=r'_METADATA: checkpoint step 6: '
                                                              'unreadable metadata'):
    training.verify_checkpoint(ckpt_dir(w), 6)


def test_no_intact_checkpoint_is_one_resume_error(model_dir, base_run, tmp_path):
  c = run_config(model_dir)
  w = copy_run(base_run, tmp_path)
  for s in (1, 2, 4, 6):
    flip_bytes(data_file(w, s, 'opt_state'))
  before = sorted(os.listdir(ckpt_dir(w)))
  with pytest.raises(training.ResumeError, match=r'no intact checkpoint \(4 tried\)') as e:
    run_train.train(c, w)
  for s in (1, 2, 4, 6):
    assert f'checkpoint step {s}: contents differ' in str(e.value)
  assert sorted(os.listdir(ckpt_dir(w))) == before  # nothing moved or deleted
  with pytest.raises(training.ResumeError, match=r'no intact checkpoint'):
    training.restore_config(w)


# ----------------------------------------------------------------------------- 4. non-finite


def write_nan_checkpoint(workdir, step, c):
  """Replaces checkpoint `step` by one whose trainable pytree is NaN (with valid checksums): what
  an older metal-jax saved from a diverged run."""
  trainable, opt_state, data = restore_all(workdir, step)
  cfg, _ = training.restore_config(workdir, step)
  shutil.rmtree(os.path.join(ckpt_dir(workdir), str(step)))
  mngr = training.checkpoint_manager(ckpt_dir(workdir))
  saver = training.CheckpointSaver(mngr, async_save=False)
  nan = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), trainable)
  assert saver.save(step, {'trainable': nan, 'opt_state': opt_state}, data, cfg)
  mngr.close()
  assert training.verify_checkpoint(ckpt_dir(workdir), step)


def test_nonfinite_checkpoint_is_refused_by_eval_and_skipped_at_resume(model_dir, base_run,
                                                                        tmp_path, caplog):
  c = run_config(model_dir, stop_at=4)
  w = copy_run(base_run, tmp_path)
  write_nan_checkpoint(w, 6, c)
  lm_cfg, pgm_cfg = lm_and_pgm(c)
  where = os.path.join(ckpt_dir(w), '6')
  for step in (None, 6):
    with pytest.raises(training.NonFiniteCheckpoint,
                       match=rf'^{where}: checkpoint step 6: the trainable pytree holds '
                             'non-finite values'):
      training.restore_trainable(w, lm_cfg, pgm_cfg, step=step)
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    run_train.train(c, w)
  assert f'{where}: checkpoint step 6: the trainable pytree holds non-finite' in caplog.text
  assert steps_on_disk(w) == [1, 2, 4]


# ----------------------------------------------------------------------------- 5. metrics.jsonl


def test_truncate_metrics_drops_a_partial_last_line(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  rows = [json.dumps({'step': s, 'loss': 1.0}) for s in (1, 2, 3)]
  path.write_text('\n'.join(rows) + '\n{"step": 4, "lo')
  with caplog.at_level(logging.WARNING, logger='metal_jax'):
    run_train.truncate_metrics(str(tmp_path), 2)
  assert path.read_text() == '\n'.join(rows[:2]) + '\n'
  assert f'{path}: dropped 1 unreadable line(s) (line 4' in caplog.text
  path.write_text(rows[0] + '\n' + rows[1])  # a last line complete but for its newline
  run_train.truncate_metrics(str(tmp_path), 5)
  assert path.read_text() == rows[0] + '\n' + rows[1] + '\n'
