"""serving.engine on a trained run: registration is content-addressed (same examples, same id,
no second PGM pass), a served classification equals what eval.py computes for that prompt, rows
of several prompts in one call equal each alone, and the slot table evicts least recently used."""

from __future__ import annotations

import numpy as np
import pytest

from metal_jax import evaluation
from metal_jax.data.tasks import tokenize_examples
from metal_jax.serving import engine as engine_lib
from metal_jax.serving.store import UnknownPrompt

EXAMPLES = [
    [{'input': 'the cat is on the table', 'output': 'red'},
     {'input': 'a dog in the river', 'output': 'blue'}],
    [{'input': 'a dog in the river', 'output': 'green'}],
    [{'input': 'the horse', 'output': 'red'}, {'input': 'the cat', 'output': 'blue'},
     {'input': 'a river', 'output': 'red'}],
]
INPUTS = ['the cat is red', 'a river of dogs', 'the']
OPTIONS = ['red', 'blue', 'green']


@pytest.fixture(scope='module')
def engine(served_run, tmp_path_factory):
  return engine_lib.Engine(served_run, store_dir=str(tmp_path_factory.mktemp('prompts')), slots=2)


def test_register_is_content_addressed(engine):
  pid, created, ms = engine.register(EXAMPLES[0], task='t0')
  assert created and ms > 0
  again, created2, _ = engine.register([dict(e) for e in EXAMPLES[0]], task='t0')
  assert again == pid and not created2
  other, _, _ = engine.register(EXAMPLES[0], owner='someone-else')
  assert other != pid
  with pytest.raises(engine_lib.RequestError, match=r'examples\[0\].output'):
    engine.register([{'input': 'x', 'output': ''}])
  with pytest.raises(engine_lib.RequestError, match=r'examples\[1\]'):
    engine.register([{'input': 'x', 'output': 'y'}, {'input': 'x'}])


def test_served_scores_equal_evaluated_scores(engine):
  """classify = evaluation.score_options for the stored prompt (n_L = 0), input by input."""
  pid, _, _ = engine.register(EXAMPLES[1])
  got = engine.classify([engine_lib.ClassifyRequest(pid, INPUTS, OPTIONS)])[0]
  prompt = engine.store.get(pid)
  queries = tokenize_examples([{'input': x, 'options': OPTIONS} for x in INPUTS],
                              engine.tokenizer, engine.max_example_len)
  want = evaluation.score_options(engine.lm.module, engine.lm.params, prompt, queries, [], queries,
                                  engine.spec)
  np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-5)
  # ... and the prompt is the one eval.py's PGM pass makes from those examples.
  demos = tokenize_examples(EXAMPLES[1], engine.tokenizer, engine.max_example_len)
  tr = engine.trained
  direct = evaluation.prompt_for(tr.pgm_cfg, tr.lm.module, tr.lm.params, tr.trainable, demos,
                                 range(len(demos)), engine.spec)
  np.testing.assert_allclose(np.asarray(prompt.kv.k), np.asarray(direct.kv.k)[:, :1], atol=1e-6)


def test_a_mixed_batch_equals_each_request_alone_and_slots_are_lru(engine):
  pids = [engine.register(ex)[0] for ex in EXAMPLES]
  reqs = [engine_lib.ClassifyRequest(pids[i % 3], INPUTS[:1 + i % 3], OPTIONS[:2 + i % 2])
          for i in range(5)]
  alone = [engine.classify([r])[0] for r in reqs]
  before = engine.slots.evictions
  mixed = engine.classify(reqs)  # 3 prompts, 2 slots: two chunks, one eviction at least
  assert engine.slots.evictions > before
  for got, want in zip(mixed, alone):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert len(engine.slots.slots) == 2
  with pytest.raises(UnknownPrompt):
    engine.classify([engine_lib.ClassifyRequest('0' * 32, INPUTS, OPTIONS)])


def test_a_deleted_prompts_slot_is_reused_without_touching_the_others(engine):
  """Regression: delete used to leave a hole that the next prompt filled with a live slot's
  index, so another prompt was scored with the new one's keys/values."""
  pids = [engine.register(ex)[0] for ex in EXAMPLES[:2]]
  req = lambda pid: engine_lib.ClassifyRequest(pid, INPUTS, OPTIONS)
  before = engine.classify([req(pids[0]), req(pids[1])])
  engine.delete(pids[1])
  new_pid, _, _ = engine.register(EXAMPLES[2])
  after, fresh = engine.classify([req(pids[0]), req(new_pid)])
  np.testing.assert_allclose(after, before[0], atol=1e-6)
  assert sorted(engine.slots.slots.values()) == sorted(set(engine.slots.slots.values()))
  assert np.abs(fresh - before[0]).max() > 1e-4
  with pytest.raises(UnknownPrompt):
    engine.classify([req(pids[1])])


def test_limits_name_the_field(engine):
  pid, _, _ = engine.register(EXAMPLES[0])
  long_input = ' '.join(['cat'] * (engine.max_input_tokens + 5))
  with pytest.raises(engine_lib.RequestError, match=r'inputs\[1\]: .* tokens; at most') as e:
    engine.classify([engine_lib.ClassifyRequest(pid, ['the cat', long_input], OPTIONS)])
  assert e.value.status == 413
  with pytest.raises(engine_lib.RequestError, match='options'):
    engine.classify([engine_lib.ClassifyRequest(pid, INPUTS, ['red', 'red'])])
  with pytest.raises(engine_lib.RequestError, match='examples') as e:
    engine.register([{'input': 'x', 'output': 'y'}] * (engine.max_examples + 1))
  assert e.value.status == 413
  engine.truncate_inputs = True  # the operator's choice: cut from the left, as eval.py does
  try:
    got = engine.classify([engine_lib.ClassifyRequest(pid, [long_input], OPTIONS)])[0]
    assert np.isfinite(got).all()
  finally:
    engine.truncate_inputs = False
