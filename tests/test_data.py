"""Task files, settings, the tokenised cache, MetaICL's direct format, meta-training episodes, and
the prefetch thread that builds them ahead of the training loop.

Everything runs on the built-in synthetic tokenizer and a tiny synthetic suite (no downloads).
Expected token sequences are rebuilt here from the raw strings with the tokenizer, independently
of the library's concatenation code.
"""

import dataclasses
import json
import os
import re
import threading
import time

import numpy as np
import pytest

from metal_jax.data import synthetic as S
from metal_jax.data import episodes as E
from metal_jax.data.episodes import EpisodeSampler, EpisodeSpec
from metal_jax.data.prefetch import Prefetcher
from metal_jax.data.tasks import (DataError, load_setting, load_tokenized, meta_train_file,
                                  task_file, validate_jsonl)

SEP, NL = '\n\n\n', '\n'
NL_ID = 2  # synthetic tokenizer: id of "\n"
BATCH_KEYS = ('pgm_ids', 'pgm_mask', 'lm_ids', 'lm_mask', 'target_pos', 'target_ids',
              'target_mask')


# ----------------------------------------------------------------------------- helpers


def write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))
  return str(path)


def ex(inp, out, options, task='t'):
  return json.dumps({'task': task, 'input': inp, 'output': out, 'options': options})


GOOD = [ex('the cat is here', 'red', ['red', 'blue']),
        ex('a dog was there', 'blue', ['red', 'blue']),
        ex('my horse and the cow', 'red', ['red', 'blue'])]


def arrow_files(d):
  return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith('.arrow')]


class CountingTokenizer:
  """Forwards everything to the wrapped tokenizer; counts calls to it."""

  def __init__(self, tok):
    self._tok = tok
    self.calls = 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._tok(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._tok, name)


@pytest.fixture(scope='module')
def tok():
  return S.build_tokenizer()


@pytest.fixture(scope='module')
def enc(tok):
  return lambda s: list(tok(s, add_special_tokens=False)['input_ids'])


@pytest.fixture(scope='module')
def suite(tmp_path_factory, tok):
  """A tiny synthetic suite and its meta-training tasks, tokenised."""
  d = str(tmp_path_factory.mktemp('suite'))
  setting = S.write_suite(d, seed=0, n_train_tasks=4, n_test_tasks=2, n_train_examples=40,
                          n_test_examples=8)
  cache = str(tmp_path_factory.mktemp('cache'))
  tasks = [load_tokenized(meta_train_file(d, t), tok, cache) for t in setting['train']]
  for t in tasks:  # precondition for the distinctness checks below
    pairs = list(zip(t.raw['input'], t.raw['output']))
    assert len(set(pairs)) == len(pairs), f'{t.path}: duplicate examples in the synthetic suite'
  return d, setting, tasks


def expected_episode(tasks, enc, seed, step, i, spec):
  """Episode i of `step` rebuilt from raw strings with the documented RNG rule.

  Returns (task index, example indices, X^P tokens, X^L + x tokens, y tokens), untruncated.
  """
  n_p, n_l = spec.n_prompt_examples, spec.n_lm_examples
  rng = np.random.default_rng([seed, step, i])
  t = int(rng.integers(len(tasks)))
  idx = [int(e) for e in rng.choice(len(tasks[t]), n_p + n_l + 1, replace=False)]
  raw = tasks[t].raw

  def seq(ids):
    out = []
    for j, e in enumerate(ids):
      out += enc(raw['input'][e] if j == 0 else SEP + raw['input'][e]) + enc(NL + raw['output'][e])
    return out

  q = idx[-1]
  x = enc((SEP if n_l else '') + raw['input'][q])
  return t, idx, seq(idx[:n_p]), seq(idx[n_p:n_p + n_l]) + x, enc(NL + raw['output'][q])


def row_parts(b, i, prompt_len):
  """(X^P tokens, LM context tokens, y tokens) of row i, read back through the masks."""
  pgm_len = b['pgm_ids'].shape[1]
  n_pgm = int(b['pgm_mask'][i].sum()) - prompt_len
  pgm = b['pgm_ids'][i, pgm_len - prompt_len - n_pgm:pgm_len - prompt_len].tolist()
  ny = int(b['target_mask'][i].sum())
  n_lm = int(b['lm_mask'][i].sum())
  lm = b['lm_ids'][i, :n_lm].tolist()
  return pgm, lm[:n_lm - ny], lm[n_lm - ny:]


# ----------------------------------------------------------------------------- 1. malformed data


def test_bad_json_names_file_and_line(tmp_path):
  p = write_lines(tmp_path / 'bad.jsonl', GOOD[:2] + ['{"task": "t", "input": oops}'] + GOOD[2:])
  with pytest.raises(DataError) as e:
    validate_jsonl(p)
  assert f'{p}:3' in str(e.value)


def test_missing_key_names_file_line_and_key(tmp_path):
  bad = json.dumps({'task': 't', 'input': 'the cat', 'output': 'red'})
  p = write_lines(tmp_path / 'nokey.jsonl', [GOOD[0], bad, GOOD[1]])
  with pytest.raises(DataError) as e:
    validate_jsonl(p)
  msg = str(e.value)
  assert f'{p}:2' in msg and 'options' in msg


def test_output_not_among_options_names_line(tmp_path):
  p = write_lines(tmp_path / 'badout.jsonl', [GOOD[0], ex('the cat', 'green', ['red', 'blue'])])
  with pytest.raises(DataError) as e:
    validate_jsonl(p)
  msg = str(e.value)
  assert f'{p}:2' in msg and 'green' in msg


def test_empty_and_missing_file_name_the_file(tmp_path):
  p = write_lines(tmp_path / 'empty.jsonl', [])
  with pytest.raises(DataError, match=re.escape(p)):
    validate_jsonl(p)
  missing = str(tmp_path / 'nope' / 'nope_16_100_train.jsonl')
  with pytest.raises(DataError, match=re.escape(missing)):
    validate_jsonl(missing)


def test_validate_counts_examples(tmp_path):
  p = write_lines(tmp_path / 'good.jsonl', GOOD)
  assert validate_jsonl(p) == 3


def test_load_tokenized_validates_before_caching(tmp_path, tok):
  cache = str(tmp_path / 'cache')
  p = write_lines(tmp_path / 'bad.jsonl', GOOD[:2] + ['{not json'])
  with pytest.raises(DataError) as e:
    load_tokenized(p, tok, cache)
  assert f'{p}:3' in str(e.value)
  p2 = write_lines(tmp_path / 'badout.jsonl', [ex('the cat', 'green', ['red', 'blue'])])
  with pytest.raises(DataError) as e:
    load_tokenized(p2, tok, cache)
  assert f'{p2}:1' in str(e.value)
  missing = str(tmp_path / 'missing.jsonl')
  with pytest.raises(DataError, match=re.escape(missing)):
    load_tokenized(missing, tok, cache)
  assert arrow_files(cache) == [], 'a malformed file reached the tokenised cache'


def test_file_names_follow_metaicl(tmp_path):
  d = str(tmp_path)
  assert task_file(d, 'glue-sst2', 16, 42, 'test') == os.path.join(
      d, 'glue-sst2', 'glue-sst2_16_42_test.jsonl')
  assert meta_train_file(d, 'ag_news') == os.path.join(d, 'ag_news', 'ag_news_16384_100_train.jsonl')


# ----------------------------------------------------------------------------- 2. settings


def test_overlapping_setting_names_tasks_and_file(tmp_path):
  p = tmp_path / 'overlap.json'
  p.write_text(json.dumps({'train': ['a', 'b', 'c', 'd'], 'test': ['d', 'e', 'b']}))
  with pytest.raises(DataError) as e:
    load_setting(str(p))
  msg = str(e.value)
  assert str(p) in msg and "'b'" in msg and "'d'" in msg
  assert "'a'" not in msg and "'e'" not in msg


def test_setting_missing_test_key(tmp_path):
  p = tmp_path / 'notest.json'
  p.write_text(json.dumps({'train': ['a', 'b']}))
  with pytest.raises(DataError) as e:
    load_setting(str(p))
  msg = str(e.value)
  assert str(p) in msg and ('"test"' in msg or "'test'" in msg)


def test_setting_by_name_is_refused_naming_it():
  """The library reads setting files only; names are resolved by configs.setting_path."""
  with pytest.raises(DataError, match=r"'cls2cls': no such file"):
    load_setting('cls2cls')


# ----------------------------------------------------------------------------- 3. tokenised cache


def _fields(t):
  return {'input_first': t.input_first, 'input_rest': t.input_rest, 'output_ids': t.output_ids,
          'option_ids': t.option_ids}


def assert_same_task(a, b):
  assert len(a) == len(b)
  for name, xs in _fields(a).items():
    ys = _fields(b)[name]
    for x, y in zip(xs, ys):
      if name == 'option_ids':
        assert len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y)), name
      else:
        assert np.array_equal(x, y), name
  assert np.array_equal(a.answer, b.answer)
  assert a.raw == b.raw


def test_cache_hit_does_not_tokenise(tmp_path, tok):
  cache = str(tmp_path / 'cache')
  p = write_lines(tmp_path / 't' / 't_16_100_train.jsonl', GOOD)
  first = CountingTokenizer(tok)
  a = load_tokenized(p, first, cache)
  assert first.calls > 0
  assert arrow_files(cache)
  second = CountingTokenizer(tok)
  b = load_tokenized(p, second, cache)
  assert second.calls == 0, f'the cached file was tokenised again ({second.calls} calls)'
  assert_same_task(a, b)


def test_changed_content_invalidates_cache(tmp_path, tok, enc):
  cache = str(tmp_path / 'cache')
  p = write_lines(tmp_path / 't' / 't_16_100_train.jsonl', GOOD)
  a = load_tokenized(p, tok, cache)
  assert a.raw['input'][0] == 'the cat is here'
  write_lines(p, [ex('some owl flew over the lake', 'blue', ['red', 'blue'])] + GOOD[1:])
  counting = CountingTokenizer(tok)
  b = load_tokenized(p, counting, cache)
  assert counting.calls > 0
  assert b.raw['input'][0] == 'some owl flew over the lake'
  assert b.input_first[0].tolist() == enc('some owl flew over the lake')
  assert b.output_ids[0].tolist() == enc('\nblue') and b.answer[0] == 1


def test_changed_content_with_same_mtime_invalidates_cache(tmp_path, tok, enc):
  """The cache is documented as keyed by the file's content, so a content change must be seen
  even when the file's modification time is unchanged (cp -p, rsync -a, tar, coarse clocks)."""
  cache = str(tmp_path / 'cache')
  p = write_lines(tmp_path / 't' / 't_16_100_train.jsonl', GOOD)
  st = os.stat(p)
  load_tokenized(p, tok, cache)
  write_lines(p, [ex('some owl flew over the lake', 'blue', ['red', 'blue'])] + GOOD[1:])
  os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
  b = load_tokenized(p, tok, cache)
  assert b.raw['input'][0] == 'some owl flew over the lake'
  assert b.input_first[0].tolist() == enc('some owl flew over the lake')


# ----------------------------------------------------------------------------- 4. direct format


HAND = [
    ('the cat is here', 'red', ['red', 'blue']),
    ('a dog and a fox', 'green', ['red', 'blue', 'green']),
    ('my apple', 'teal', ['gold', 'teal', 'navy', 'plum']),
    ('where is the bus', 'blue', ['red', 'blue']),
]


def test_direct_format_by_hand(tmp_path, tok, enc):
  p = write_lines(tmp_path / 'hand' / 'hand_16_100_train.jsonl', [ex(*h) for h in HAND])
  t = load_tokenized(p, tok, str(tmp_path / 'cache'))
  assert len(t) == len(HAND) and t.path == p
  for i, (inp, out, opts) in enumerate(HAND):
    assert t.input_first[i].tolist() == enc(inp)
    assert t.input_rest[i].tolist() == enc(SEP + inp)
    assert t.input_rest[i].tolist()[:3] == [NL_ID] * 3
    assert t.output_ids[i].tolist() == enc(NL + out)
    assert [o.tolist() for o in t.option_ids[i]] == [enc(NL + o) for o in opts]
    assert t.answer[i] == opts.index(out)
    assert t.input_first[i].dtype == np.int32 and t.output_ids[i].dtype == np.int32
  assert t.raw == {'input': [h[0] for h in HAND], 'output': [h[1] for h in HAND],
                   'options': [h[2] for h in HAND]}
  assert 1 not in np.concatenate(t.input_first)  # no [UNK]: the words are in the vocabulary
  t.truncate(2)
  assert len(t) == 2 and len(t.answer) == 2 and t.raw['output'] == ['red', 'green']


LONG = ' '.join(['the', 'cat', 'was', 'in', 'a', 'garden', 'with', 'the', 'dog', 'and', 'an',
                 'owl', 'on', 'the', 'tower'])  # 15 tokens


def _long_task(tmp_path, tok, max_example_len):
  p = write_lines(tmp_path / 'long' / 'long_16_100_train.jsonl',
                  [ex(LONG, 'red', ['red', 'blue']), ex('the cat', 'blue', ['red', 'blue'])])
  return load_tokenized(p, tok, str(tmp_path / 'cache'), max_example_len=max_example_len)


def test_long_example_cut_from_left_of_input(tmp_path, tok, enc):
  max_len = 8
  t = _long_task(tmp_path, tok, max_len)
  y = enc(NL + 'red')
  assert t.output_ids[0].tolist() == y  # the output is never cut
  keep = max_len - len(y)
  assert t.input_first[0].tolist() == enc(LONG)[-keep:]  # the input's last tokens survive
  assert len(t.input_first[0]) + len(y) == max_len
  assert len(t.input_rest[0]) + len(y) <= max_len
  rest = t.input_rest[0].tolist()
  n_words = len([i for i in rest if i != NL_ID])
  assert n_words > 0 and rest[-n_words:] == enc(LONG)[-n_words:]
  # the short example is untouched
  assert t.input_first[1].tolist() == enc('the cat')
  assert t.input_rest[1].tolist() == enc(SEP + 'the cat')


def test_long_example_keeps_three_newline_separator(tmp_path, tok, enc):
  """Cutting the *input* must not remove the separator that precedes it: every example after the
  first is "\\n\\n\\n" + input in MetaICL's direct format, or concatenated examples run together."""
  max_len = 8
  t = _long_task(tmp_path, tok, max_len)
  keep = max_len - len(enc(NL + 'red'))
  rest = t.input_rest[0].tolist()
  assert rest[:3] == [NL_ID] * 3, f'input_rest lost its separator: {rest}'
  assert rest == [NL_ID] * 3 + enc(LONG)[-(keep - 3):]


# ----------------------------------------------------------------------------- 5. episodes

SPEC = EpisodeSpec(n_prompt_examples=4, n_lm_examples=2, prompt_len=5, max_len=256)
SEED = 7


def test_batch_layout_and_hand_rebuilt_episodes(suite, enc):
  _, _, tasks = suite
  b_size, p = 6, SPEC.prompt_len
  sampler = EpisodeSampler(tasks, SPEC, batch_size=b_size, seed=SEED)
  step = 3
  b = sampler.batch(step)
  assert set(b) == set(BATCH_KEYS)
  for k in BATCH_KEYS:
    assert b[k].dtype == np.int32 and b[k].shape[0] == b_size
  pgm_len, lm_len = b['pgm_ids'].shape[1], b['lm_ids'].shape[1]
  y_len = b['target_ids'].shape[1]
  assert b['pgm_mask'].shape == (b_size, pgm_len) and b['lm_mask'].shape == (b_size, lm_len)
  assert b['target_pos'].shape == b['target_mask'].shape == (b_size, y_len)
  for i in range(b_size):
    _, _, xp, ctx, y = expected_episode(tasks, enc, SEED, step, i, SPEC)
    assert len(xp) + p <= SPEC.max_len and len(ctx) + len(y) <= SPEC.lm_budget  # no cutting here
    n = len(xp)
    # PGM: left padding, X^P, then exactly P slots at the end
    assert b['pgm_ids'][i].tolist()[:pgm_len - p] == [0] * (pgm_len - p - n) + xp
    assert b['pgm_mask'][i].tolist() == [0] * (pgm_len - p - n) + [1] * (n + p)
    assert b['pgm_mask'][i, -p:].all()
    # LM: X^L + x + y, right-padded
    seq = ctx + y
    assert b['lm_ids'][i].tolist() == seq + [0] * (lm_len - len(seq))
    assert b['lm_mask'][i].tolist() == [1] * len(seq) + [0] * (lm_len - len(seq))
    # targets: exactly y's tokens, each predicted from the position before it
    ny = len(y)
    assert b['target_mask'][i].tolist() == [1] * ny + [0] * (y_len - ny)
    assert b['target_ids'][i, :ny].tolist() == y
    assert b['target_pos'][i, :ny].tolist() == list(range(len(ctx) - 1, len(seq) - 1))
    m = b['target_mask'][i].astype(bool)
    assert (b['lm_ids'][i][b['target_pos'][i][m] + 1] == b['target_ids'][i][m]).all()


def test_halves_collate_apart_and_together(suite):
  """A batch is its two halves: each collated alone gives exactly its keys of the episode batch,
  so scoring (LM half) and prompt generation (PGM half) never build the other half."""
  _, _, tasks = suite
  sampler = EpisodeSampler(tasks, SPEC, batch_size=5, seed=SEED)
  eps = [sampler.episode(2, i) for i in range(5)]
  pgm_len, lm_len, tgt_len = E.batch_shapes(eps, SPEC)
  full = E.collate(eps, SPEC, pgm_len, lm_len, tgt_len)
  pgm = E.collate_pgm([e.pgm_tokens for e in eps], SPEC, E.pgm_length([e.pgm_tokens for e in eps],
                                                                       SPEC))
  lm = E.collate_lm([e.lm for e in eps], *E.lm_lengths([e.lm for e in eps], SPEC))
  assert set(pgm) == {'pgm_ids', 'pgm_mask'} and set(pgm) | set(lm) == set(full)
  for k, v in {**pgm, **lm}.items():
    np.testing.assert_array_equal(v, full[k])
  np.testing.assert_array_equal(full['lm_ids'], sampler.batch(2)['lm_ids'])
  longer = SPEC.with_prompt_len(SPEC.prompt_len + 30)
  assert longer.lm_budget == SPEC.lm_budget - 30 and SPEC.with_prompt_len(SPEC.prompt_len) is SPEC


def test_query_is_bare_without_lm_demonstrations(suite, enc):
  _, _, tasks = suite
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=0, prompt_len=4, max_len=128)
  b = EpisodeSampler(tasks, spec, batch_size=4, seed=1).batch(0)
  for i in range(4):
    t, idx, xp, ctx, y = expected_episode(tasks, enc, 1, 0, i, spec)
    assert ctx == enc(tasks[t].raw['input'][idx[-1]])  # no separator before a first example
    assert ctx[0] != NL_ID
    assert row_parts(b, i, spec.prompt_len) == (xp, ctx, y)


def _pairs(tok, ids):
  """(input, output) pairs of an untruncated direct-format concatenation."""
  text = ' '.join(tok.convert_ids_to_tokens(ids))
  out = []
  for chunk in text.split(' \n \n \n '):
    inp, outp = chunk.rsplit(' ', 1)  # the suite's outputs are one "\nlabel" token
    assert outp.startswith('\n'), chunk
    out.append((inp, outp[1:]))
  return out


def test_episode_examples_distinct_and_from_one_task(suite, tok):
  _, _, tasks = suite
  task_pairs = [set(zip(t.raw['input'], t.raw['output'])) for t in tasks]
  sampler = EpisodeSampler(tasks, SPEC, batch_size=8, seed=SEED)
  seen_tasks = set()
  for step in range(4):
    b = sampler.batch(step)
    for i in range(8):
      pgm, ctx, y = row_parts(b, i, SPEC.prompt_len)
      pairs = _pairs(tok, pgm) + _pairs(tok, ctx + y)
      assert len(pairs) == SPEC.n_prompt_examples + SPEC.n_lm_examples + 1
      assert len(set(pairs)) == len(pairs), f'step {step} row {i}: repeated example'
      owners = [k for k, s in enumerate(task_pairs) if set(pairs) <= s]
      assert len(owners) == 1, f'step {step} row {i}: examples not from one task'
      seen_tasks.add(owners[0])
  assert len(seen_tasks) > 1  # the episodes do draw different tasks


# ----------------------------------------------------------------------------- 6. determinism


def assert_batches_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def test_batches_are_a_function_of_seed_and_step(suite):
  _, _, tasks = suite
  s1 = EpisodeSampler(tasks, SPEC, batch_size=4, seed=SEED)
  s2 = EpisodeSampler(tasks, SPEC, batch_size=4, seed=SEED)
  assert_batches_equal(s1.batch(5), s2.batch(5))
  assert_batches_equal(s1.batch(2), s1.batch(2))
  mine, other = s1.batch(5), EpisodeSampler(tasks, SPEC, batch_size=4, seed=SEED + 1).batch(5)
  assert any(mine[k].shape != other[k].shape or not np.array_equal(mine[k], other[k])
             for k in BATCH_KEYS)
  assert not np.array_equal(s1.batch(0)['lm_ids'][:, :8], s1.batch(1)['lm_ids'][:, :8])


def test_process_split_concatenates_to_global_batch(suite):
  _, _, tasks = suite
  b_size = 6
  for step in (0, 4):
    full = EpisodeSampler(tasks, SPEC, batch_size=b_size, seed=SEED).batch(step)
    parts = [EpisodeSampler(tasks, SPEC, batch_size=b_size, seed=SEED, process_index=r,
                            process_count=2).batch(step) for r in range(2)]
    for part in parts:
      for k in BATCH_KEYS:
        assert part[k].shape == (b_size // 2,) + full[k].shape[1:], k
    assert_batches_equal({k: np.concatenate([q[k] for q in parts]) for k in BATCH_KEYS}, full)


def test_iteration_state_and_restore(suite):
  _, _, tasks = suite
  s = EpisodeSampler(tasks, SPEC, batch_size=2, seed=SEED)
  files = {os.path.basename(t.path): f'{t.fingerprint}:{len(t)}' for t in tasks}
  assert s.state() == {'seed': SEED, 'step': 0, 'tasks': files}
  got = [next(s) for _ in range(3)]
  for step, b in enumerate(got):
    assert_batches_equal(b, s.batch(step))
  state = s.state()
  assert state == {'seed': SEED, 'step': 3, 'tasks': files}
  state = json.loads(json.dumps(state))  # survives a JSON round trip (checkpoints)
  r = EpisodeSampler(tasks, SPEC, batch_size=2, seed=SEED)
  r.restore(state)
  assert_batches_equal(next(r), next(iter(s)))
  assert_batches_equal(next(r), next(s))
  assert r.state() == s.state() == {'seed': SEED, 'step': 5, 'tasks': files}
  wrong = EpisodeSampler(tasks, SPEC, batch_size=2, seed=SEED + 1)
  with pytest.raises(ValueError, match='seed'):
    wrong.restore(state)


def test_restore_refuses_changed_data(suite, tok, tmp_path):
  """Resuming over task files that changed since the checkpoint is refused, naming the files."""
  d, setting, tasks = suite
  state = json.loads(json.dumps(EpisodeSampler(tasks, SPEC, batch_size=2, seed=SEED).state()))
  state['step'] = 3
  edited = str(tmp_path / os.path.basename(tasks[1].path))
  with open(tasks[1].path, encoding='utf-8') as f:
    lines = f.readlines()
  with open(edited, 'w', encoding='utf-8') as f:
    f.writelines(lines[1:] + lines[:1])  # the same examples in another order: other episodes
  changed = load_tokenized(edited, tok, str(tmp_path / 'cache'))
  name1, name3 = os.path.basename(tasks[1].path), os.path.basename(tasks[3].path)
  r = EpisodeSampler([tasks[0], changed, tasks[2]], SPEC, batch_size=2, seed=SEED)
  with pytest.raises(ValueError, match=rf'/ckpt: .*{name1} \(changed\), {name3} \(removed\)'):
    r.restore(state, where='/ckpt')
  assert r.step == 0  # nothing was restored
  r = EpisodeSampler(tasks[:1], SPEC, batch_size=2, seed=SEED)
  r.restore({'seed': SEED, 'step': 3})  # a checkpoint from before fingerprints: accepted as is
  assert r.step == 3


# ----------------------------------------------------------------------------- 7. truncation

def test_iterative_episodes_draw_disjoint_chunks_from_one_task(suite):
  """prompt_chunks = 2: each episode draws 2 n_P + n_L + 1 distinct examples of one task; the
  second PGM pass reads the next n_P (pgm_ids_1, padded like pgm_ids); with one chunk the draws
  and the batch are what they were."""
  _, _, tasks = suite
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=1, prompt_len=4, max_len=128,
                     prompt_chunks=2)
  b = EpisodeSampler(tasks, spec, batch_size=4, seed=SEED).batch(0)
  assert b['pgm_ids_1'].shape == b['pgm_ids'].shape == b['pgm_mask_1'].shape
  for i in range(4):
    rng = np.random.default_rng([SEED, 0, i])
    task = tasks[rng.integers(len(tasks))]
    idx = rng.choice(len(task), 2 * 3 + 1 + 1, replace=False)
    assert len(set(idx.tolist())) == 8
    for key, chunk in (('pgm_ids', idx[:3]), ('pgm_ids_1', idx[3:6])):
      want = E.concat_examples(task, chunk)
      n = len(want)
      assert b[key][i, -4 - n:-4].tolist() == want.tolist()
      assert int(b[key.replace('ids', 'mask')][i].sum()) == n + 4
    half = E.build_lm_half(E.concat_examples(task, idx[6:7]), task.input_first[idx[7]],
                           task.input_rest[idx[7]], task.output_ids[idx[7]], spec)
    assert b['lm_ids'][i, :len(half.context)].tolist() == half.context.tolist()
  one = dataclasses.replace(spec, prompt_chunks=1)
  b1 = EpisodeSampler(tasks, one, batch_size=4, seed=SEED).batch(0)
  assert 'pgm_ids_1' not in b1
  for i in range(4):  # the first chunk and the LM half come from the same draw's positions
    e1 = EpisodeSampler(tasks, one, batch_size=4, seed=SEED).episode(0, i)
    rng = np.random.default_rng([SEED, 0, i])
    task = tasks[rng.integers(len(tasks))]
    idx = rng.choice(len(task), 3 + 1 + 1, replace=False)
    assert e1.pgm_tokens.tolist() == E.concat_examples(task, idx[:3]).tolist()


def test_episodes_with_several_queries(suite):
  """queries = 3: each episode draws n_P + n_L + 3 distinct examples of one task, the last 3 its
  queries, each after the same X^L; the LM keys are [B, 3, ...]; the PGM half and the draws
  are those of one query."""
  _, _, tasks = suite
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=1, prompt_len=4, max_len=128, queries=3)
  b = EpisodeSampler(tasks, spec, batch_size=4, seed=SEED).batch(0)
  assert b['pgm_ids'].shape[0] == 4 and b['lm_ids'].shape[:2] == (4, 3)
  assert all(b[k].shape[:2] == (4, 3) for k in ('lm_mask', 'target_pos', 'target_ids',
                                                 'target_mask'))
  for i in range(4):
    rng = np.random.default_rng([SEED, 0, i])
    task = tasks[rng.integers(len(tasks))]
    idx = rng.choice(len(task), 3 + 1 + 3, replace=False)
    want = E.concat_examples(task, idx[:3])
    assert b['pgm_ids'][i, -4 - len(want):-4].tolist() == want.tolist()
    for j, q in enumerate(idx[4:]):
      half = E.build_lm_half(E.concat_examples(task, idx[3:4]), task.input_first[q],
                             task.input_rest[q], task.output_ids[q], spec)
      n, ny = len(half.context), len(half.target)
      assert b['lm_ids'][i, j, :n + ny].tolist() == half.context.tolist() + half.target.tolist()
      assert b['target_ids'][i, j, :ny].tolist() == half.target.tolist()
      assert int(b['target_mask'][i, j].sum()) == ny
  assert EpisodeSampler(tasks, spec, 4, SEED).episodes_per_epoch == sum(len(t) // 7 for t in tasks)
  with pytest.raises(ValueError, match='n_P \\+ n_L \\+ queries = 100'):
    EpisodeSampler(tasks, dataclasses.replace(spec, queries=96), 4, SEED)


# Short enough that X^P and X^L + x are cut.
SMALL = EpisodeSpec(n_prompt_examples=8, n_lm_examples=6, prompt_len=8, max_len=48)


def test_truncation_fits_and_cuts_from_left(suite, enc):
  _, _, tasks = suite
  spec, b_size = SMALL, 8
  budget = spec.max_len - spec.prompt_len
  b = EpisodeSampler(tasks, spec, batch_size=b_size, seed=SEED).batch(0)
  assert b['pgm_ids'].shape[1] <= spec.max_len
  cut_pgm = cut_lm = 0
  for i in range(b_size):
    t, idx, xp, ctx, y = expected_episode(tasks, enc, SEED, 0, i, spec)
    pgm, got_ctx, got_y = row_parts(b, i, spec.prompt_len)
    assert len(pgm) + spec.prompt_len <= spec.max_len
    assert len(got_ctx) + len(got_y) <= budget
    assert int(b['lm_mask'][i].sum()) + spec.prompt_len <= spec.max_len
    assert got_y == y  # y is never cut
    assert pgm == xp[-budget:]  # X^P loses its first tokens
    assert got_ctx == ctx[-(budget - len(y)):]  # X^L + x loses its first tokens
    x = enc(SEP + tasks[t].raw['input'][idx[-1]])
    assert got_ctx[-len(x):] == x  # the query's input survives whole (it is short)
    cut_pgm += len(xp) > budget
    cut_lm += len(ctx) + len(y) > budget
  assert cut_pgm and cut_lm, 'the test needs episodes that are actually cut'


def test_padded_lm_length_fits_with_prompt(suite):
  """The LM runs on P prompt positions + lm_ids, so the padded lm_ids (not just its real tokens)
  must fit in max_len - P: positions past the model's limit are out of range for the position
  embeddings."""
  _, _, tasks = suite
  spec = SMALL
  for step in range(3):
    b = EpisodeSampler(tasks, spec, batch_size=8, seed=SEED).batch(step)
    assert b['lm_ids'].shape[1] + spec.prompt_len <= spec.max_len, (
        f'step {step}: lm_ids padded to {b["lm_ids"].shape[1]}, + prompt_len {spec.prompt_len} '
        f'> max_len {spec.max_len} (real tokens: {int(b["lm_mask"].sum(1).max())})')
    assert b['pgm_ids'].shape[1] <= spec.max_len


# ----------------------------------------------------------------------------- 8. bucketing


def test_shapes_come_from_buckets_and_are_few(suite):
  _, _, tasks = suite
  spec = SPEC
  buckets = spec.length_buckets()
  assert buckets == tuple(sorted(buckets)) and buckets[-1] == spec.max_len
  s = EpisodeSampler(tasks, spec, batch_size=4, seed=SEED)
  shapes = set()
  for step in range(20):
    b = s.batch(step)
    pgm_len, lm_len, y_len = (b['pgm_ids'].shape[1], b['lm_ids'].shape[1],
                              b['target_ids'].shape[1])
    assert pgm_len in buckets and lm_len in buckets
    assert y_len in spec.target_buckets + (spec.lm_budget,)
    # the smallest bucket that fits
    smaller = [x for x in buckets if x < pgm_len]
    assert not smaller or int(b['pgm_mask'].sum(1).max()) > smaller[-1]
    smaller = [x for x in buckets if x < lm_len]
    assert not smaller or int(b['lm_mask'].sum(1).max()) > smaller[-1]
    shapes.add((pgm_len, lm_len, y_len))
  assert 1 <= len(shapes) <= 4, shapes


def test_explicit_buckets_include_max_len():
  spec = EpisodeSpec(max_len=100, buckets=(48, 16, 48))
  assert spec.length_buckets() == (16, 48, 100)
  assert EpisodeSpec(max_len=256).length_buckets() == (32, 64, 128, 256)
  assert EpisodeSpec(max_len=256, buckets_per_octave=4).length_buckets() == (
      32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
  assert EpisodeSpec(max_len=100, buckets_per_octave=2).length_buckets() == (32, 48, 64, 96, 100)
  with pytest.raises(ValueError, match='buckets_per_octave=3'):
    EpisodeSpec(buckets_per_octave=3).length_buckets()


def test_finer_buckets_pad_the_same_rows_less(suite):
  """buckets_per_octave = 4: the same episodes, padded to the smallest of the finer lengths that
  fits; the rows' tokens are the same, only the padding is shorter."""
  _, _, tasks = suite
  coarse = EpisodeSpec(n_prompt_examples=5, prompt_len=4, max_len=256)
  fine = dataclasses.replace(coarse, buckets_per_octave=4)
  a, b = (EpisodeSampler(tasks, s, batch_size=4, seed=SEED).batch(0) for s in (coarse, fine))
  longest = int(a['pgm_mask'].sum(1).max())
  assert b['pgm_ids'].shape[1] == min(x for x in fine.length_buckets() if x >= longest)
  assert b['pgm_ids'].shape[1] < a['pgm_ids'].shape[1], (a['pgm_ids'].shape, longest)
  cut = a['pgm_ids'].shape[1] - b['pgm_ids'].shape[1]
  np.testing.assert_array_equal(a['pgm_ids'][:, cut:], b['pgm_ids'])  # left padding removed
  np.testing.assert_array_equal(a['pgm_mask'][:, cut:], b['pgm_mask'])
  assert not a['pgm_mask'][:, :cut].any()
  n = b['lm_ids'].shape[1]
  np.testing.assert_array_equal(a['lm_ids'][:, :n], b['lm_ids'])  # right padding removed
  assert not a['lm_mask'][:, n:].any()


# ----------------------------------------------------------------------------- 9. refusals


def test_sampler_refuses_small_task_and_bad_batch_split(suite, tmp_path, tok):
  _, _, tasks = suite
  p = write_lines(tmp_path / 'tiny' / 'tiny_16384_100_train.jsonl', GOOD)  # 3 examples
  tiny = load_tokenized(p, tok, str(tmp_path / 'cache'))
  spec = EpisodeSpec(n_prompt_examples=2, n_lm_examples=1, prompt_len=4, max_len=128)  # needs 4
  with pytest.raises(ValueError, match=re.escape(p)):
    EpisodeSampler(tasks + [tiny], spec, batch_size=2, seed=0)
  ok = EpisodeSpec(n_prompt_examples=1, n_lm_examples=1, prompt_len=4, max_len=128)  # needs 3
  EpisodeSampler([tiny], ok, batch_size=2, seed=0).batch(0)
  with pytest.raises(ValueError, match='divisible'):
    EpisodeSampler(tasks, SPEC, batch_size=5, seed=0, process_index=0, process_count=2)


# ----------------------------------------------------------------------------- 10. prefetch


def closed_promptly(p: Prefetcher) -> bool:
  """Closes p from a helper thread; False if close() is still waiting a minute later (a hang)."""
  t = threading.Thread(target=p.close, daemon=True)
  t.start()
  t.join(60)
  return not t.is_alive() and (p._thread is None or not p._thread.is_alive())


@pytest.mark.parametrize('depth', [0, 1, 2, 5])
def test_prefetch_gives_the_samplers_batches_in_step_order(suite, depth):
  """Batches s..s+n through the prefetcher equal the sampler's own, from step 0 and from a resumed
  step alike; with depth > 0 they are built in the prefetch thread, with 0 in the caller's."""
  _, _, tasks = suite
  s = EpisodeSampler(tasks, SPEC, batch_size=3, seed=SEED)
  threads = []

  def load(step):
    threads.append(threading.current_thread())
    return s.batch(step)

  for start in (0, 4):  # 4: a run resumed from the checkpoint at step 4
    resumed = EpisodeSampler(tasks, SPEC, batch_size=3, seed=SEED)
    resumed.restore({**s.state(), 'step': start})
    want = [next(resumed) for _ in range(6)]
    with Prefetcher(load, start, start + 6, depth) as p:
      got = list(p)
      assert p.step == start + 6
    assert len(got) == len(want) == 6
    for a, b, step in zip(got, want, range(start, start + 6)):
      assert_batches_equal(a, b)
      assert_batches_equal(a, s.batch(step))
  if depth:
    assert threads and all(t is not threading.main_thread() for t in threads)
  else:
    assert threads and all(t is threading.main_thread() for t in threads)


@pytest.mark.parametrize('depth', [0, 2])
def test_prefetch_error_surfaces_in_the_loop_with_its_message(suite, depth):
  """An exception while building step 3's batch reaches the consumer at step 3 (the batches before
  it first), as itself: type and message; asking again raises it again, and the thread is gone."""
  _, _, tasks = suite
  s = EpisodeSampler(tasks, SPEC, batch_size=2, seed=SEED)

  def load(step):
    if step == 3:
      raise DataError(f'/data/t/t_16384_100_train.jsonl: broken while building step {step}')
    return s.batch(step)

  p = Prefetcher(load, 0, 10, depth)
  for step in range(3):
    assert_batches_equal(next(p), s.batch(step))
  for _ in range(2):
    with pytest.raises(DataError, match=r't_16384_100_train\.jsonl: broken while building step 3'):
      next(p)
  assert p.step == 3
  assert closed_promptly(p)


def test_prefetch_stops_when_the_loop_stops():
  """Leaving the `with` block (here by an exception in the loop, as at stop_at or a preemption)
  stops the thread, even while it is blocked on a full queue, and the rest of the range is never
  built: at most the batches queued and the one in progress beyond those consumed."""
  calls = []

  def load(step):
    calls.append(step)
    return step

  with pytest.raises(KeyboardInterrupt):
    with Prefetcher(load, 5, 10**9, depth=2) as p:
      assert [next(p), next(p)] == [5, 6]
      for _ in range(6000):  # (a minute at most) until the queue is full and put() blocks
        if len(calls) == 2 + 2 + 1:
          break
        time.sleep(0.01)
      raise KeyboardInterrupt
  assert p._thread is not None and not p._thread.is_alive()
  assert calls == list(range(5, 5 + len(calls))) and len(calls) <= 2 + 2 + 1
  with pytest.raises(RuntimeError, match='closed'):
    next(p)
  assert closed_promptly(p)  # closing twice is harmless


def test_prefetch_refuses_negative_depth():
  with pytest.raises(ValueError, match='depth must be >= 0, got -1'):
    Prefetcher(lambda step: step, 0, 3, depth=-1)


# ----------------------------------------------------------------------------- 10. BOS (Llama)


@pytest.fixture(scope='module')
def llama_tok_dir(tmp_path_factory):
  """A Llama checkpoint directory as Meta's original downloads ship it: config.json and a bare
  sentencepiece tokenizer.model (trained here on a few sentences; BOS id 1)."""
  import io
  import sentencepiece as spm
  from conftest import save_hf
  d = tmp_path_factory.mktemp('llama_spm')
  save_hf('llama', d, bos_token_id=1, eos_token_id=2)
  corpus = ['the cat sat on the mat', 'a dog ran far away', 'great film', 'bad film',
            'positive negative', 'review of a movie'] * 40
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=60,
                                 model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 minloglevel=2)
  (d / 'tokenizer.model').write_bytes(buf.getvalue())
  return d


def test_bos_where_transformers_puts_it(llama_tok_dir, tmp_path):
  """With a tokenizer that adds BOS (Llama's, loaded from a bare tokenizer.model), every sequence
  the LM or the PGM reads starts with it: a zero-shot query reads exactly tokenizer(x), an ICL
  sequence BOS + X^L + x, the PGM BOS + X^P; cutting to fit never drops BOS. The built-in
  (GPT-2-like) tokenizer adds none, and sequences are unchanged."""
  from metal_jax.data.tasks import bos_token
  from metal_jax.models.hf import load_tokenizer
  tok = load_tokenizer(str(llama_tok_dir))
  assert type(tok).__name__ == 'LlamaTokenizer'
  assert bos_token(tok) == tok.bos_token_id == 1
  assert bos_token(S.build_tokenizer()) is None
  examples = [{'task': 'task', 'input': 'the cat sat on the mat', 'output': 'great',
               'options': ['great', 'bad']},
              {'task': 'task', 'input': 'a dog ran far away', 'output': 'bad',
               'options': ['great', 'bad']},
              {'task': 'task', 'input': 'review of a movie', 'output': 'great',
               'options': ['great', 'bad']}]
  path = write_lines(tmp_path / 'task_16_100_train.jsonl', [json.dumps(e) for e in examples])
  task = load_tokenized(path, tok, str(tmp_path / 'cache'))
  spec = EpisodeSpec(n_prompt_examples=2, n_lm_examples=1, prompt_len=4, max_len=64,
                     bos_id=bos_token(tok))
  empty = np.zeros(0, np.int32)
  plain = lambda text: tok(text, add_special_tokens=False)['input_ids']
  for i, e in enumerate(examples):  # zero-shot: what transformers gives the model for x
    half = E.build_lm_half(empty, task.input_first[i], task.input_rest[i], task.output_ids[i], spec)
    assert half.context.tolist() == tok(e['input'])['input_ids']
  demos = E.concat_examples(task, [0])
  half = E.build_lm_half(demos, task.input_first[2], task.input_rest[2], task.output_ids[2], spec)
  assert half.context.tolist() == [1] + demos.tolist() + task.input_rest[2].tolist()
  pgm = E.build_pgm_half(E.concat_examples(task, [0, 1]), spec)
  assert pgm.tolist() == [1] + E.concat_examples(task, [0, 1]).tolist()
  assert pgm[1:3].tolist() == plain(examples[0]['input'])[:2]
  short = dataclasses.replace(spec, max_len=spec.prompt_len + 6)  # both halves must be cut
  half = E.build_lm_half(demos, task.input_first[2], task.input_rest[2], task.output_ids[2], short)
  assert half.context[0] == 1 and len(half.context) + len(half.target) == short.lm_budget
  assert half.context[1:].tolist() == np.concatenate([demos, task.input_rest[2]]).tolist()[
      -(short.lm_budget - 1 - len(half.target)):]
  pgm = E.build_pgm_half(E.concat_examples(task, [0, 1]), short)
  assert pgm[0] == 1 and len(pgm) == short.pgm_budget
  batch = E.collate_pgm([pgm], short, short.max_len)
  assert batch['pgm_ids'][0, :short.pgm_budget].tolist() == pgm.tolist()  # BOS right after padding
  gpt2_like = dataclasses.replace(spec, bos_id=None)
  half = E.build_lm_half(empty, task.input_first[0], task.input_rest[0], task.output_ids[0],
                         gpt2_like)
  assert half.context.tolist() == plain(examples[0]['input'])
