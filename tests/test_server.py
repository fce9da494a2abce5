"""serving.server over a trained run, through a real uvicorn server on 127.0.0.1 (a free port,
`server.serve_in_thread`) and a real HTTP client (httpx over the socket):

* the API: register, list, get, delete, classify, generate; /metrics and /healthz;
* served scores equal engine.classify and eval.py's: a test task of the run's own synthetic suite,
  its 16 `_train` examples of one seed registered, its `_test` inputs classified with the task's
  options, equal (1e-5, same predictions) to evaluation.score_options with prompt_for's prompt;
* prompts survive a restart (a new Engine on the same store: listed, same scores, registering the
  examples again is created=false with no PGM pass), and a corrupted entry is reported in
  store.problems and refused (409) while the others are served;
* 32 concurrent clients over 8 tasks are batched into fewer engine calls, each answer equal to the
  request alone; a failing batched call is retried one by one;
* overload: a flood beyond the queue is answered 429, every accepted request completes, and the
  server stays up; a request that cannot start in time is 504;
* a corpus of malformed requests (bad JSON, wrong types, empty and oversized fields: 413 naming
  the field, unknown ids, duplicate options, bodies over max_body_bytes) each gets a 4xx with a
  message while unicode inputs are served, and the server answers a good request afterwards;
* API keys (the one-key-a-line file): a second key can neither see, nor use, nor delete the first
  key's prompts (404 each); serve.py's user mistakes are one line, and serve.py itself serves with
  its limit flags.

Servers are module fixtures where they can be shared (the main one, a batching one); the queue and
timeout tests start small apps of their own. Every server is stopped in its fixture's teardown or
its `with` block, and every client has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from metal_jax import evaluation, experiment
from metal_jax.data.tasks import tokenize_examples
from metal_jax.serving import engine as engine_lib
from metal_jax.serving import generate as gen
from metal_jax.serving import server

from test_engine import EXAMPLES, INPUTS, OPTIONS  # one hand-made set for engine and server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = dict(max_inputs=8, max_options=4, max_new_tokens=16, max_body_bytes=1 << 20)
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@dataclasses.dataclass
class Running:
  app: object
  url: str
  client: httpx.Client


@contextlib.contextmanager
def running(app, headers=None):
  """A real server for `app` and a client of it; both closed (the server stopped) on exit."""
  with server.serve_in_thread(app) as url:
    with httpx.Client(base_url=url, timeout=TIMEOUT, headers=headers) as client:
      yield Running(app, url, client)
  assert not app.state.batcher.running  # the lifespan stopped the worker


def concurrently(url, calls, headers=None, limit_s=120):
  """(method, path[, json]) calls sent at once, each on its own connection -> responses."""
  async def main():
    limits = httpx.Limits(max_connections=len(calls) + 1, max_keepalive_connections=len(calls))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits,
                                 headers=headers) as client:
      def one(call):
        method, path, *body = call
        return client.request(method, path, json=body[0] if body else None)
      return await asyncio.wait_for(asyncio.gather(*(one(c) for c in calls)), limit_s)
  return asyncio.run(main())


def error_of(response) -> dict:
  assert 'Traceback' not in response.text
  err = response.json()['error']
  assert err['message'], response.text
  return err


def sample_value(app, name, labels=None) -> float:
  return app.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def classify_call(pid, inputs=INPUTS, options=OPTIONS):
  return ('POST', '/v1/classify', {'prompt_id': pid, 'inputs': inputs, 'options': options})


def flip_last_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) - 1)
    last = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([last[0] ^ 0xFF]))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def engine(served_run, tmp_path_factory):
  return engine_lib.Engine(served_run, store_dir=str(tmp_path_factory.mktemp('prompts')), slots=4)


@pytest.fixture(scope='module')
def pids(engine):
  return [engine.register(ex)[0] for ex in EXAMPLES]


@pytest.fixture(scope='module')
def main(engine):
  """The shared server (no API keys, serve.py's batching defaults, small request limits)."""
  with running(server.create_app(engine, **LIMITS)) as r:
    yield r


@pytest.fixture(scope='module')
def batching(engine):
  """A server that waits long enough for concurrent requests to share engine calls."""
  with running(server.create_app(engine, max_batch_rows=512, max_wait_ms=300, **LIMITS)) as r:
    yield r


@pytest.fixture(scope='module')
def eval_task(served_run, engine, tmp_path_factory):
  """A test task of the run's synthetic suite under one seed, loaded as eval.py loads it."""
  config = engine.trained.config
  assert (config.n_prompt_examples, config.n_lm_examples) == (16, 0)  # n_P = 16, no X^L
  data_dir, setting = experiment.data_location(config, served_run)
  ts, = evaluation.load_task_seeds(data_dir, setting['test'][:1], [100], engine.tokenizer,
                                   str(tmp_path_factory.mktemp('tokenized')),
                                   config.max_example_len)
  assert len(ts.train) == 16 and len(ts.test) > 0
  return ts


def train_examples(ts) -> list[dict]:
  return [{'input': x, 'output': y} for x, y in zip(ts.train.raw['input'], ts.train.raw['output'])]


def classify_task(client, pid, ts) -> tuple[list[np.ndarray], list[str]]:
  """The task's test inputs classified through the API, one request per distinct options list:
  (scores per input [n_options], predictions) in the task's order."""
  groups: dict[tuple, list[int]] = {}
  for q, options in enumerate(ts.test.raw['options']):
    groups.setdefault(tuple(options), []).append(q)
  scores, preds = [None] * len(ts.test), [None] * len(ts.test)
  for options, idx in groups.items():
    r = client.post('/v1/classify', json={'prompt_id': pid, 'options': list(options),
                                          'inputs': [ts.test.raw['input'][q] for q in idx]})
    assert r.status_code == 200, r.text
    for q, s, p in zip(idx, r.json()['scores'], r.json()['predictions']):
      scores[q], preds[q] = np.asarray(s), p
  return scores, preds


def assert_scores_close(got, want):
  assert len(got) == len(want)
  for q, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=f'input {q}')


# ----------------------------------------------------------------------------- prompts


def test_register_list_get_delete(main):
  c = main.client
  examples = [{'input': 'a small bird', 'output': 'blue'}, {'input': 'big tree', 'output': 'green'}]
  first = c.post('/v1/prompts', json={'examples': examples, 'task': 'birds'})
  again = c.post('/v1/prompts', json={'examples': examples})
  assert first.status_code == 201 and first.json()['created'] is True
  pid = first.json()['prompt_id']
  assert first.json()['pgm_ms'] > 0
  assert again.status_code == 200
  assert again.json()['prompt_id'] == pid and again.json()['created'] is False
  assert pid in [m['id'] for m in c.get('/v1/prompts').json()['prompts']]
  meta = c.get(f'/v1/prompts/{pid}')
  assert meta.status_code == 200 and meta.json()['task'] == 'birds'
  assert meta.json()['examples'] == examples
  body = {'prompt_id': pid, 'inputs': ['a bird'], 'options': ['blue', 'green']}
  assert c.post('/v1/classify', json=body).status_code == 200
  deleted = c.delete(f'/v1/prompts/{pid}')
  assert deleted.status_code == 204 and deleted.content == b''
  for r in (c.get(f'/v1/prompts/{pid}'), c.post('/v1/classify', json=body),
            c.delete(f'/v1/prompts/{pid}')):
    assert r.status_code == 404 and error_of(r)['field'] == 'prompt_id'
  assert pid not in [m['id'] for m in c.get('/v1/prompts').json()['prompts']]
  # The engine's own checks of the examples name the field too.
  bad = c.post('/v1/prompts', json={'examples': [{'input': 'x', 'output': ' '}]})
  assert bad.status_code == 422 and error_of(bad)['field'] == 'examples[0].output'
  bad = c.post('/v1/prompts', json={'examples': [{'input': 'x'}]})
  assert bad.status_code == 422 and error_of(bad)['field'] == 'examples[0].output'


def test_deleting_a_prompt_leaves_the_others_scores_unchanged(main, engine):
  """Every prompt resident in a device slot, one deleted, another loaded: each remaining
  prompt still scores as before (the deleted one's slot must not be handed out twice)."""
  c = main.client
  examples = [[{'input': f'the bird {i} sleeps', 'output': 'red'}] * (1 + i % 3)
              for i in range(engine.slots.n_slots + 1)]
  pids = [c.post('/v1/prompts', json={'examples': ex}).json()['prompt_id'] for ex in examples]
  body = lambda pid: {'prompt_id': pid, 'inputs': INPUTS, 'options': OPTIONS}
  keep, victim, late = pids[1:-1], pids[0], pids[-1]
  c.post('/v1/classify', json=body(victim))
  before = [c.post('/v1/classify', json=body(p)).json()['scores'] for p in keep]
  assert c.delete(f'/v1/prompts/{victim}').status_code == 204
  assert c.post('/v1/classify', json=body(late)).status_code == 200
  for pid, b in zip(keep, before):
    after = c.post('/v1/classify', json=body(pid))
    assert after.status_code == 200
    np.testing.assert_allclose(after.json()['scores'], b, rtol=0, atol=1e-5, err_msg=pid)


def test_a_corrupt_prompt_is_reported_refused_409_and_registering_again_repairs_it(
    main, engine, pids):
  c = main.client
  examples = [{'input': 'the river runs', 'output': 'blue'}]
  pid = c.post('/v1/prompts', json={'examples': examples}).json()['prompt_id']
  others = [c.post('/v1/classify', json={'prompt_id': p, 'inputs': INPUTS, 'options': OPTIONS})
            for p in pids]
  path = os.path.join(engine.store.root, pid + '.safetensors')
  flip_last_byte(path)  # one flipped byte in the tensors
  engine.store._uncache(pid)  # as after a host cache eviction: the next use re-reads the files
  body = {'prompt_id': pid, 'inputs': ['the river'], 'options': ['blue', 'red']}
  refused = c.post('/v1/classify', json=body)
  assert refused.status_code == 409 and error_of(refused)['field'] == 'prompt_id'
  assert 'register' in error_of(refused)['message']
  assert path in dict(engine.store.problems)
  assert c.post('/v1/generate', json={'prompt_id': pid, 'input': 'the'}).status_code == 409
  for p, before in zip(pids, others):  # the others are still served, unchanged
    r = c.post('/v1/classify', json={'prompt_id': p, 'inputs': INPUTS, 'options': OPTIONS})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()['scores'], before.json()['scores'], rtol=0, atol=1e-5)
  again = c.post('/v1/prompts', json={'examples': examples})
  assert again.status_code == 201 and again.json()['prompt_id'] == pid
  assert c.post('/v1/classify', json=body).status_code == 200
  assert path not in dict(engine.store.problems)


# ----------------------------------------------------------------------------- classification


def test_served_scores_equal_the_engine_and_evaluation(main, engine, pids):
  pid = pids[1]
  r = main.client.post('/v1/classify', json={'prompt_id': pid, 'inputs': INPUTS,
                                             'options': OPTIONS})
  assert r.status_code == 200
  got = np.asarray(r.json()['scores'])
  assert got.shape == (len(INPUTS), len(OPTIONS))
  direct = engine.classify([engine_lib.ClassifyRequest(pid, INPUTS, OPTIONS)])[0]
  np.testing.assert_allclose(got, direct, rtol=0, atol=1e-5)
  queries = tokenize_examples([{'input': x, 'options': OPTIONS} for x in INPUTS],
                              engine.tokenizer, engine.max_example_len)
  want = evaluation.score_options(engine.lm.module, engine.lm.params, engine.store.get(pid),
                                  queries, [], queries, engine.spec)
  np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-5)
  assert r.json()['predictions'] == [OPTIONS[int(i)] for i in np.argmin(np.stack(want), axis=1)]


def test_register_then_classify_equals_eval_py_on_a_test_task(main, engine, eval_task):
  """The run's split is (16, 0): eval.py's MetaL prompt is one PGM pass over the seed's 16
  `_train` examples and its predictions score the `_test` inputs against each one's options."""
  ts = eval_task
  made = main.client.post('/v1/prompts', json={'examples': train_examples(ts),
                                               'task': ts.task})
  assert made.status_code in (200, 201), made.text
  got, preds = classify_task(main.client, made.json()['prompt_id'], ts)
  tr = engine.trained
  prompt = evaluation.prompt_for(tr.pgm_cfg, tr.lm.module, tr.lm.params, tr.trainable, ts.train,
                                 range(16), engine.spec)
  want = evaluation.score_options(engine.lm.module, engine.lm.params, prompt, ts.train, [],
                                  ts.test, engine.spec)
  assert_scores_close(got, want)
  assert preds == evaluation.predict(want, ts.test)


def test_prompts_survive_a_restart_and_a_corrupted_entry_is_refused(served_run, eval_task,
                                                                    tmp_path, monkeypatch):
  """Server 1 registers prompts and stops; a NEW Engine on the same store and a new server list
  them, score them the same, and register the same examples again without a PGM pass. An entry
  whose tensors were damaged while the server was down is reported and refused (409), one whose
  JSON was damaged is reported at start-up (and unknown: its owner cannot be read); the others
  are served."""
  passes = []
  real = evaluation.prompt_for

  def counted(*args, **kwargs):
    passes.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(evaluation, 'prompt_for', counted)  # engine.register calls it by name
  ts, store = eval_task, str(tmp_path / 'store')
  first = engine_lib.Engine(served_run, store_dir=store, slots=2)
  with running(server.create_app(first, **LIMITS)) as s:
    made = s.client.post('/v1/prompts', json={'examples': train_examples(ts), 'task': ts.task})
    assert made.status_code == 201
    pid = made.json()['prompt_id']
    scores, preds = classify_task(s.client, pid, ts)
    damaged, unreadable = [s.client.post('/v1/prompts', json={'examples': ex}).json()['prompt_id']
                           for ex in EXAMPLES[:2]]
  assert len(passes) == 3
  flip_last_byte(os.path.join(store, damaged + '.safetensors'))
  with open(os.path.join(store, unreadable + '.json'), 'w') as f:
    f.write('{"format": 1, "id": ')

  second = engine_lib.Engine(served_run, store_dir=store, slots=2)
  assert list(dict(second.store.problems)) == [os.path.join(second.store.root,
                                                            unreadable + '.json')]
  with running(server.create_app(second, **LIMITS)) as s:
    listed = [m['id'] for m in s.client.get('/v1/prompts').json()['prompts']]
    assert pid in listed and unreadable not in listed
    again, again_preds = classify_task(s.client, pid, ts)
    assert_scores_close(again, scores)
    assert again_preds == preds
    re = s.client.post('/v1/prompts', json={'examples': train_examples(ts), 'task': ts.task})
    assert re.status_code == 200 and re.json() == {**made.json(), 'created': False}
    assert len(passes) == 3  # no PGM pass
    refused = s.client.post('/v1/classify', json={'prompt_id': damaged, 'inputs': ['the'],
                                                  'options': OPTIONS})
    assert refused.status_code == 409 and error_of(refused)['field'] == 'prompt_id'
    assert os.path.join(second.store.root, damaged + '.safetensors') in dict(
        second.store.problems)
    assert damaged not in [m['id'] for m in s.client.get('/v1/prompts').json()['prompts']]
    gone = s.client.get(f'/v1/prompts/{unreadable}')
    assert gone.status_code == 404
    assert_scores_close(classify_task(s.client, pid, ts)[0], scores)  # still served


def test_32_concurrent_clients_over_8_tasks_each_equal_to_one_at_a_time(main, batching, engine,
                                                                        pids):
  """32 clients at once over 8 prompts (2 more than the engine's device slots), plus an unknown
  prompt and 3 generations in the same flood: batched into fewer engine calls, every answer
  equal to the same request sent alone, the bad one failing alone."""
  c = main.client
  tasks = [[{'input': f'the {w} sleeps', 'output': OPTIONS[i % 3]},
            {'input': f'a {w} runs', 'output': OPTIONS[(i + 1) % 3]}]
           for i, w in enumerate(['cat', 'dog', 'horse', 'bird', 'tree', 'river', 'house', 'tab'])]
  tpids = [c.post('/v1/prompts', json={'examples': ex}).json()['prompt_id'] for ex in tasks]
  bodies = [{'prompt_id': tpids[i % 8], 'inputs': [f'{INPUTS[i % 3]} {i}'] + INPUTS[:i % 3],
             'options': OPTIONS[:2 + i % 2]} for i in range(32)]
  alone = [c.post('/v1/classify', json=b) for b in bodies]
  assert all(r.status_code == 200 for r in alone)
  unknown = {'prompt_id': '0' * 32, 'inputs': INPUTS, 'options': OPTIONS}
  gens = [{'prompt_id': pids[i], 'input': INPUTS[i], 'max_new_tokens': 4 + i} for i in range(3)]
  calls = ([('POST', '/v1/classify', b) for b in bodies[:16]] + [('POST', '/v1/classify', unknown)]
           + [('POST', '/v1/classify', b) for b in bodies[16:]]
           + [('POST', '/v1/generate', g) for g in gens])
  batcher = batching.app.state.batcher
  before = dict(batcher.calls)
  together = concurrently(batching.url, calls)
  assert together[16].status_code == 404 and error_of(together[16])['field'] == 'prompt_id'
  classified = together[:16] + together[17:33]
  assert all(r.status_code == 200 for r in classified + together[33:]), [r.text for r in together]
  assert batcher.calls['classify'] - before.get('classify', 0) < 32
  assert batcher.calls['generate'] - before.get('generate', 0) < 3
  for b, t, a in zip(bodies, classified, alone):
    assert len(t.json()['scores']) == len(b['inputs'])
    np.testing.assert_allclose(t.json()['scores'], a.json()['scores'], rtol=0, atol=1e-5)
    assert t.json()['predictions'] == a.json()['predictions']
  for g, t in zip(gens, together[33:]):
    want, = engine.generate([engine_lib.GenerateRequest(
        g['prompt_id'], g['input'], gen.SamplingParams(max_new_tokens=g['max_new_tokens']))])
    assert t.json() == {'text': want.text, 'tokens': want.tokens,
                        'finish_reason': want.finish_reason}


def test_a_failing_batched_call_is_retried_one_by_one(batching, engine, pids, monkeypatch):
  real = engine.classify

  def flaky(requests):
    if any('POISON' in r.inputs for r in requests):
      raise RuntimeError('boom')
    return real(requests)

  monkeypatch.setattr(engine, 'classify', flaky)
  batcher = batching.app.state.batcher
  before = batcher.calls['classify']
  bodies = [{'prompt_id': pids[0], 'inputs': ['the cat'], 'options': OPTIONS},
            {'prompt_id': pids[1], 'inputs': ['POISON'], 'options': OPTIONS},
            {'prompt_id': pids[2], 'inputs': ['a dog'], 'options': OPTIONS}]
  ok0, bad, ok2 = concurrently(batching.url, [('POST', '/v1/classify', b) for b in bodies])
  assert ok0.status_code == ok2.status_code == 200
  assert bad.status_code == 500 and 'boom' not in bad.text and 'Traceback' not in bad.text
  assert batcher.calls['classify'] - before == 4  # the batch, then each alone


# ----------------------------------------------------------------------------- generation


def test_generate_greedy_equals_the_engine_and_respects_stop_and_length(main, engine, pids):
  c = main.client
  body = {'prompt_id': pids[0], 'input': 'the cat is', 'max_new_tokens': 8}
  r = c.post('/v1/generate', json=body)
  assert r.status_code == 200
  want, = engine.generate([engine_lib.GenerateRequest(pids[0], 'the cat is',
                                                      gen.SamplingParams(max_new_tokens=8))])
  assert r.json() == {'text': want.text, 'tokens': want.tokens, 'finish_reason': want.finish_reason}
  short = c.post('/v1/generate', json={**body, 'max_new_tokens': 2})
  assert short.json()['tokens'] == want.tokens[:2] and len(short.json()['tokens']) <= 2
  text = want.text
  assert text.strip(), 'the greedy text is empty: pick another input'
  stop = text.split()[-1]
  stopped = c.post('/v1/generate', json={**body, 'stop': [stop]})
  assert stopped.json()['finish_reason'] == 'stop'
  assert stopped.json()['text'] == text[:text.find(stop)]
  assert len(stopped.json()['tokens']) <= len(want.tokens)
  sampled = [c.post('/v1/generate', json={**body, 'temperature': 1.0, 'seed': 7}) for _ in '12']
  assert sampled[0].json() == sampled[1].json()  # a seed reproduces its draw


# ----------------------------------------------------------------------------- errors


def test_malformed_requests_get_4xx_naming_the_field_and_the_server_carries_on(main, engine,
                                                                               pids):
  c, pid = main.client, pids[0]
  good = classify_call(pid)
  before = c.post('/v1/classify', json=good[2])
  assert before.status_code == 200
  json_ct = {'content-type': 'application/json'}
  cls = lambda **kw: ('POST', '/v1/classify', {'prompt_id': pid, 'inputs': ['x'],
                                               'options': ['a', 'b'], **kw})
  gen_ = lambda **kw: ('POST', '/v1/generate', {'prompt_id': pid, 'input': 'the cat', **kw})
  reg = lambda examples: ('POST', '/v1/prompts', {'examples': examples})
  long_input = ' '.join(['cat'] * (engine.max_input_tokens + 1))
  cases = [  # (call, status, field)
      # bodies that are not a request
      (('POST', '/v1/classify', b'{"prompt_id": ', json_ct), 422, 'body'),
      (('POST', '/v1/classify', b'hello', {}), 422, 'body'),
      (('POST', '/v1/classify', b'[1, 2]', json_ct), 422, 'body'),
      (('POST', '/v1/classify', b'', json_ct), 422, 'body'),
      (('POST', '/v1/classify', b'[' * 100_000, json_ct), 400, 'body'),
      (('POST', '/v1/classify', b'{"prompt_id": "\xff\xfe"}', json_ct), 400, 'body'),
      # wrong types and unknown fields
      (cls(inputs='x'), 422, 'inputs'),
      (cls(inputs=['x', 3]), 422, 'inputs[1]'),
      (cls(prompt_id=5), 422, 'prompt_id'),
      (cls(options=[None]), 422, 'options[0]'),
      (cls(extra=1), 422, 'extra'),
      (gen_(max_new_tokens='8'), 422, 'max_new_tokens'),
      (gen_(temperature=True), 422, 'temperature'),
      (gen_(seed=-1), 422, 'seed'),
      (reg([{'input': 1, 'output': 'x'}]), 422, 'examples[0].input'),
      (reg('x'), 422, 'examples'),
      # empty and malformed values
      (reg([]), 422, 'examples'),
      (cls(inputs=[]), 422, 'inputs'),
      (cls(options=[]), 422, 'options'),
      (cls(options=['a', '']), 422, 'options[1]'),
      (cls(options=['a', 'b', 'a']), 422, 'options[2]'),
      (gen_(temperature=-1), 422, 'temperature'),
      (gen_(top_p=0), 422, 'top_p'),
      (gen_(top_k=1.5), 422, 'top_k'),
      (gen_(stop=['']), 422, 'stop'),
      (gen_(max_new_tokens=0), 422, 'max_new_tokens'),
      (gen_(input=''), 422, 'input'),
      # over a limit: 413 naming the field
      (cls(inputs=['x', long_input]), 413, 'inputs[1]'),
      (gen_(input=long_input), 413, 'input'),
      (reg([{'input': 'x', 'output': 'y'}] * (engine.max_examples + 1)), 413, 'examples'),
      (cls(inputs=['x'] * (LIMITS['max_inputs'] + 1)), 413, 'inputs'),
      (cls(options=[f'o{i}' for i in range(LIMITS['max_options'] + 1)]), 413, 'options'),
      (gen_(max_new_tokens=LIMITS['max_new_tokens'] + 1), 413, 'max_new_tokens'),
      (gen_(stop=[f's{i}' for i in range(server.MAX_STOP + 1)]), 413, 'stop'),
      (cls(inputs=['x' * (LIMITS['max_body_bytes'] + 1)]), 413, 'body'),
      # unknown ids, paths and methods
      (cls(prompt_id='f' * 32), 404, 'prompt_id'),
      (gen_(prompt_id='../../etc/passwd'), 404, 'prompt_id'),
      (('GET', '/v1/prompts/' + 'x' * 5000), 404, 'prompt_id'),
      (('DELETE', '/v1/prompts/..%2F..%2Fsecrets'), 404, None),  # no such route
      (('GET', '/v1/nothing'), 404, None),
      (('PUT', '/v1/classify', {}), 405, None),
  ]
  for call, status, field in cases:
    method, path, *rest = call
    if rest and isinstance(rest[0], bytes):
      r = c.request(method, path, content=rest[0], headers=rest[1])
    else:
      r = c.request(method, path, json=rest[0] if rest else None)
    assert r.status_code == status, (call[:2], str(call[2:])[:200], r.status_code, r.text[:300])
    assert error_of(r)['field'] == field, (str(call)[:200], r.text[:300])

  # A body over max_body_bytes sent in chunks (no Content-Length) is cut off at the limit too.
  def chunks():
    for _ in range(LIMITS['max_body_bytes'] // 65536 + 2):
      yield b'x' * 65536
  r = c.post('/v1/classify', content=chunks(), headers=json_ct)
  assert r.status_code == 413 and error_of(r)['field'] == 'body'

  # Unicode (and control characters) are inputs like any other.
  unicode_ok = [
      classify_call(pid, ['naïve café 日本語 🎉', 'Ελληνικά\u0000\ttab', ''], ['ja', 'нет']),
      ('POST', '/v1/generate', {'prompt_id': pid, 'input': 'the 猫 🐈', 'max_new_tokens': 2}),
      reg([{'input': 'çà et là 🌍', 'output': 'ünïcödé'}, {'input': 'x', 'output': '日本'}])]
  for method, path, body in unicode_ok:
    r = c.request(method, path, json=body)
    assert r.status_code in (200, 201), (body, r.text)
  # ... and after all of that, the server answers as before.
  assert c.get('/healthz').json()['status'] == 'ok'
  after = c.post('/v1/classify', json=good[2])
  assert after.status_code == 200 and after.json() == before.json()


def test_truncate_inputs_serves_long_inputs_as_eval_py_cuts_them(served_run, engine, pids):
  cutting = engine_lib.Engine(served_run, store_dir=engine.store.root, slots=2,
                              truncate_inputs=True)
  long_input = ' '.join(['the cat', 'a dog'] * engine.max_example_len)
  with running(server.create_app(cutting, **LIMITS)) as s:
    r = s.client.post('/v1/classify', json={'prompt_id': pids[0], 'inputs': [long_input, 'the'],
                                            'options': OPTIONS})
    assert r.status_code == 200, r.text
    # Generation cuts the input to max_input_tokens too; here that is still more than this
    # model's 128 positions hold: refused, naming the limit.
    g = s.client.post('/v1/generate', json={'prompt_id': pids[0], 'input': long_input,
                                            'max_new_tokens': 2})
    assert g.status_code == 422 and 'positions' in error_of(g)['message'], g.text
  queries = tokenize_examples([{'input': x, 'options': OPTIONS} for x in (long_input, 'the')],
                              engine.tokenizer, engine.max_example_len)
  want = evaluation.score_options(engine.lm.module, engine.lm.params, engine.store.get(pids[0]),
                                  queries, [], queries, engine.spec)
  np.testing.assert_allclose(r.json()['scores'], np.stack(want), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- tenants


def test_api_keys_file_and_tenant_isolation(engine, tmp_path):
  path = tmp_path / 'keys.txt'
  path.write_text('# tenants of this server\n\n  alice-key-0123 alice\nbob-key-4567\n')
  keys = server.load_api_keys(str(path))
  bob_owner = 'key-' + hashlib.sha256(b'bob-key-4567').hexdigest()[:16]
  assert keys == {'alice-key-0123': 'alice', 'bob-key-4567': bob_owner}
  alice = {'Authorization': 'Bearer alice-key-0123'}
  bob = {'Authorization': 'Bearer bob-key-4567'}
  with running(server.create_app(engine, api_keys=keys, **LIMITS)) as s:
    c = s.client
    for headers in ({}, {'Authorization': 'Bearer nope'}, {'Authorization': 'alice-key-0123'}):
      r = c.get('/v1/prompts', headers=headers)
      assert r.status_code == 401 and r.headers['www-authenticate'] == 'Bearer'
      assert error_of(r)['field'] == 'authorization'
    assert c.get('/healthz').status_code == c.get('/metrics').status_code == 200
    made = c.post('/v1/prompts', json={'examples': EXAMPLES[0]}, headers=alice)
    assert made.status_code in (200, 201)
    pid = made.json()['prompt_id']
    body = {'prompt_id': pid, 'inputs': ['the cat'], 'options': OPTIONS}
    gen_body = {'prompt_id': pid, 'input': 'the cat', 'max_new_tokens': 2}
    mine = c.post('/v1/classify', json=body, headers=alice)
    assert mine.status_code == 200
    assert c.get(f'/v1/prompts/{pid}', headers=alice).status_code == 200
    assert pid in [m['id'] for m in c.get('/v1/prompts', headers=alice).json()['prompts']]
    # bob: cannot see, use or delete alice's prompt, as if it did not exist
    assert pid not in [m['id'] for m in c.get('/v1/prompts', headers=bob).json()['prompts']]
    for r in (c.get(f'/v1/prompts/{pid}', headers=bob),
              c.post('/v1/classify', json=body, headers=bob),
              c.post('/v1/generate', json=gen_body, headers=bob),
              c.delete(f'/v1/prompts/{pid}', headers=bob)):
      assert r.status_code == 404 and error_of(r)['field'] == 'prompt_id', r.text
    theirs = c.post('/v1/prompts', json={'examples': EXAMPLES[0]}, headers=bob)
    assert theirs.status_code == 201 and theirs.json()['prompt_id'] != pid  # bob's own prompt
    bob_meta = c.get(f'/v1/prompts/{theirs.json()["prompt_id"]}', headers=bob).json()
    assert bob_meta['owner'] == bob_owner
    # alice's prompt is untouched
    still = c.post('/v1/classify', json=body, headers=alice)
    assert still.status_code == 200 and still.json() == mine.json()
    assert c.post('/v1/generate', json=gen_body, headers=alice).status_code == 200
    assert c.get(f'/v1/prompts/{pid}', headers=alice).status_code == 200
  for name in os.listdir(engine.store.root):  # raw keys are never written to the store
    with open(os.path.join(engine.store.root, name), 'rb') as f:
      data = f.read()
    assert b'bob-key-4567' not in data and b'alice-key-0123' not in data


def test_load_api_keys_mistakes_name_the_file_and_line(tmp_path):
  def mistake(text, match):
    path = tmp_path / 'keys.txt'
    path.write_text(text)
    with pytest.raises(server.ConfigError, match=match) as e:
      server.load_api_keys(str(path))
    assert 'secret' not in str(e.value)  # never quotes a key
    assert f'--api_keys={path}' in str(e.value)

  mistake('secret-1 alice\n# c\nsecret-2 bob extra\n', r'line 3: 3 fields')
  mistake('secret-1 alice\n\nsecret-1 bob\n', r'line 3: duplicate key \(first on line 1\)')
  mistake('# only a comment\n\n', 'no keys')
  mistake('secrét-1 alice\n', 'line 1: a key must be printable ASCII')
  with pytest.raises(server.ConfigError, match='cannot read'):
    server.load_api_keys(str(tmp_path / 'missing.txt'))


# ----------------------------------------------------------------------------- overload


def _gate(engine, monkeypatch):
  """engine.classify blocked until released: (entered, release)."""
  entered, release = threading.Event(), threading.Event()
  real = engine.classify

  def blocked(requests):
    entered.set()
    release.wait(60)
    return real(requests)

  monkeypatch.setattr(engine, 'classify', blocked)
  return entered, release


def test_a_flood_beyond_the_queue_is_429_accepted_requests_complete_server_stays_up(
    engine, pids, monkeypatch):
  entered, release = _gate(engine, monkeypatch)
  queue_size, flood = 4, 40
  body = {'prompt_id': pids[0], 'inputs': ['the cat'], 'options': OPTIONS}
  rows = len(OPTIONS)  # one request a call: the running one, and queue_size queued
  app = server.create_app(engine, queue_size=queue_size, max_batch_rows=rows, max_wait_ms=0,
                          timeout_s=60, **LIMITS)

  async def main(url):
    limits = httpx.Limits(max_connections=flood + 2)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as c:
      tasks = [asyncio.create_task(c.post('/v1/classify', json=body)) for _ in range(flood)]
      deadline = time.monotonic() + 60
      while sum(t.done() for t in tasks) < flood - queue_size - 1:
        assert time.monotonic() < deadline, 'the flood was not answered'
        await asyncio.sleep(0.01)
      assert entered.is_set() and app.state.batcher.depth == queue_size
      health = await c.get('/healthz')  # answered while the engine is busy and the queue full
      rejected = [t.result() for t in tasks if t.done()]
      release.set()
      done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
      return health, rejected, done

  try:
    with running(app) as s:
      health, rejected, done = asyncio.run(main(s.url))
      assert s.client.get('/healthz').json()['status'] == 'ok'
      after = s.client.post('/v1/classify', json=body)
      assert after.status_code == 200
  finally:
    release.set()
  assert health.status_code == 200 and health.json()['queue'] == queue_size
  assert len(rejected) == flood - queue_size - 1
  for r in rejected:
    assert r.status_code == 429 and int(r.headers['retry-after']) >= 1
    assert 'queue' in error_of(r)['message']
  accepted = [r for r in done if r.status_code != 429]
  assert len(accepted) == queue_size + 1
  assert all(r.status_code == 200 and r.json() == after.json() for r in accepted)
  assert sample_value(app, 'metal_errors_total', {'endpoint': '/v1/classify',
                                                  'status': '429'}) == len(rejected)


def test_a_request_that_cannot_start_in_time_is_504(engine, pids, monkeypatch):
  entered, release = _gate(engine, monkeypatch)
  app = server.create_app(engine, queue_size=1, timeout_s=0.5, max_wait_ms=0, **LIMITS)
  body = {'prompt_id': pids[0], 'inputs': ['the cat'], 'options': OPTIONS}

  async def main(url):
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
      running_ = asyncio.create_task(c.post('/v1/classify', json=body))
      assert await asyncio.to_thread(entered.wait, 30)  # started: the worker is blocked in it
      queued = asyncio.create_task(c.post('/v1/classify', json=body))
      timed_out = await asyncio.wait_for(queued, 30)  # its deadline passes before it starts
      release.set()
      done = await asyncio.wait_for(running_, 60)  # started before its deadline: answered
      return timed_out, done

  try:
    with running(app) as s:
      timed_out, done = asyncio.run(main(s.url))
      assert s.client.post('/v1/classify', json=body).status_code == 200
  finally:
    release.set()
  assert timed_out.status_code == 504 and 'Traceback' not in timed_out.text
  assert done.status_code == 200 and len(done.json()['scores']) == 1
  assert sample_value(app, 'metal_errors_total', {'endpoint': '/v1/classify',
                                                  'status': '504'}) == 1


# ----------------------------------------------------------------------------- operations


def test_metrics_and_healthz(main, engine, pids):
  c = main.client
  assert c.post('/v1/classify', json={'prompt_id': pids[2], 'inputs': ['a'],
                                      'options': OPTIONS}).status_code == 200
  health, metrics = c.get('/healthz'), c.get('/metrics')
  assert health.json()['status'] == 'ok'
  assert health.json()['step'] == engine.identity['step'] and health.json()['prompts'] >= 3
  text = metrics.text
  for name in ('metal_requests_total', 'metal_errors_total', 'metal_request_seconds_bucket',
               'metal_batch_rows_bucket', 'metal_batch_requests_bucket', 'metal_queue_depth',
               'metal_engine_calls_total', 'metal_store_hits_total', 'metal_store_misses_total',
               'metal_store_evictions_total', 'metal_slot_loads_total',
               'metal_slot_evictions_total', 'metal_compilations'):
    assert name in text, name
  assert sample_value(main.app, 'metal_requests_total', {'endpoint': '/v1/classify',
                                                         'status': '200'}) >= 1
  assert sample_value(main.app, 'metal_slot_loads_total') == engine.slots.loads > 0
  assert sample_value(main.app, 'metal_compilations') > 0
  assert metrics.headers['content-type'].startswith('text/plain')


def test_serve_py_user_mistakes_are_one_line(served_run, tmp_path):
  bad_keys = tmp_path / 'keys.txt'
  bad_keys.write_text('k1 alice\nk1 bob\n')
  for args, named in (([f'--workdir={tmp_path / "missing"}'], '--workdir='),
                      ([f'--workdir={served_run}', f'--api_keys={bad_keys}'],
                       f'--api_keys={bad_keys}, line 2: duplicate key')):
    p = subprocess.run([sys.executable, 'serve.py', *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('serve.py: ') and named in lines[0], p.stderr


def test_serve_py_serves_with_its_limit_flags(served_run, tmp_path):
  """serve.py itself, as an operator starts it: API keys from a file, the limit flags."""
  keys = tmp_path / 'keys.txt'
  keys.write_text('op-key-1 operator\n')
  port = free_port()
  log = open(tmp_path / 'serve.log', 'w+')  # a file, not a pipe: a full pipe would block it
  proc = subprocess.Popen(
      [sys.executable, 'serve.py', f'--workdir={served_run}', f'--store_dir={tmp_path / "store"}',
       f'--port={port}', f'--api_keys={keys}', '--max_examples=2', '--max_input_tokens=3',
       '--max_body_bytes=4096', '--max_inputs=2', '--max_options=3', '--slots=2'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
  try:
    url = f'http://127.0.0.1:{port}'
    with httpx.Client(base_url=url, timeout=TIMEOUT,
                      headers={'Authorization': 'Bearer op-key-1'}) as c:
      deadline = time.monotonic() + 120
      while True:
        assert proc.poll() is None, (tmp_path / 'serve.log').read_text()
        assert time.monotonic() < deadline, 'serve.py did not start'
        try:
          if c.get('/healthz').status_code == 200:
            break
        except httpx.TransportError:
          time.sleep(0.2)
      assert c.get('/v1/prompts', headers={'Authorization': 'Bearer x'}).status_code == 401
      ex = {'input': 'the cat', 'output': 'red'}
      too_many = c.post('/v1/prompts', json={'examples': [ex] * 3})
      assert too_many.status_code == 413 and error_of(too_many)['field'] == 'examples'
      made = c.post('/v1/prompts', json={'examples': [ex] * 2})
      assert made.status_code == 201
      pid = made.json()['prompt_id']
      cases = [({'prompt_id': pid, 'inputs': ['the cat', 'a b c d'], 'options': OPTIONS},
                'inputs[1]'),
               ({'prompt_id': pid, 'inputs': ['a'] * 3, 'options': OPTIONS}, 'inputs'),
               ({'prompt_id': pid, 'inputs': ['a'], 'options': OPTIONS + ['x']}, 'options'),
               ({'prompt_id': pid, 'inputs': ['a' * 5000], 'options': OPTIONS}, 'body')]
      for body, field in cases:
        r = c.post('/v1/classify', json=body)
        assert r.status_code == 413 and error_of(r)['field'] == field, r.text
      ok = c.post('/v1/classify', json={'prompt_id': pid, 'inputs': ['the cat'],
                                        'options': OPTIONS})
      assert ok.status_code == 200
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(10)
    log.close()
  with open(os.path.join(tmp_path / 'store', pid + '.json'), encoding='utf-8') as f:
    assert '"owner": "operator"' in f.read()
