"""The synthetic suite: MetaICL file layout, determinism, idempotence, tokenizer, and that tasks
are solvable from their 16 examples but not without them."""

import collections
import json
import os

import pytest

from metal_jax.data import synthetic as S

SMALL = dict(n_train_tasks=6, n_test_tasks=4, n_train_examples=64, n_test_examples=32)


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def all_files(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, d)] = fh.read()
  return out


@pytest.fixture(scope='module')
def suite(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('suite'))
  return d, S.write_suite(d, seed=0, **SMALL)


@pytest.fixture(scope='module')
def tok():
  return S.build_tokenizer()


def key_of(task, inp):
  """The word that decides the label: the last word (in kw_cls also the one content word)."""
  words = inp.split()
  if task.startswith('kw_cls'):
    assert [w for w in words if w in S.CONTENT_WORDS] == [words[-1]], inp
  return words[-1]


def test_layout_and_counts(suite):
  d, setting = suite
  with open(os.path.join(d, 'setting.json')) as f:
    assert json.load(f) == setting
  assert os.path.isfile(os.path.join(d, 'suite.json'))
  train, test = setting['train'], setting['test']
  assert len(train) == SMALL['n_train_tasks'] and len(test) == SMALL['n_test_tasks']
  assert not set(train) & set(test) and len(set(train + test)) == len(train + test)
  for fam in S.FAMILIES:  # both families on both sides
    assert any(t.startswith(fam) for t in train) and any(t.startswith(fam) for t in test)
  expected = {'setting.json', 'suite.json'}
  for t in train:
    expected.add(f'{t}/{t}_16384_100_train.jsonl')
  for t in test:
    for s in S.SEEDS:
      expected |= {f'{t}/{t}_16_{s}_train.jsonl', f'{t}/{t}_16_{s}_test.jsonl',
                   f'{t}/{t}_64_{s}_train.jsonl'}
  assert set(all_files(d)) == expected  # no leftover tmp files either

  for t in train:
    rows = read_jsonl(os.path.join(d, t, f'{t}_16384_100_train.jsonl'))
    assert len(rows) == SMALL['n_train_examples']
    check_rows(rows, t)
  for t in test:
    tests = [read_jsonl(os.path.join(d, t, f'{t}_16_{s}_test.jsonl')) for s in S.SEEDS]
    trains = [read_jsonl(os.path.join(d, t, f'{t}_16_{s}_train.jsonl')) for s in S.SEEDS]
    assert all(r == tests[0] for r in tests)  # same evaluation split for every seed
    assert len(tests[0]) == SMALL['n_test_examples']
    assert all(len(r) == 16 for r in trains)
    more = [read_jsonl(os.path.join(d, t, f'{t}_64_{s}_train.jsonl')) for s in S.SEEDS]
    assert all(len(m) == 64 and m[:16] == r for m, r in zip(more, trains))  # the 16 come first
    assert len({json.dumps(m[16:]) for m in more}) == len(S.SEEDS)
    for rows in more:
      check_rows(rows, t)
    assert len({json.dumps(r) for r in trains}) == len(S.SEEDS)  # different examples per seed
    for rows in tests + trains:
      check_rows(rows, t)
    counts = collections.Counter(r['output'] for r in tests[0])  # balanced classes
    assert set(counts) == set(tests[0][0]['options'])
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({r['output'] for r in tests[0][:8]}) > 1  # shuffled, not grouped by label


def check_rows(rows, task):
  options = rows[0]['options']
  assert 2 <= len(options) <= 4 and len(set(options)) == len(options)
  for r in rows:
    assert list(r) == ['task', 'input', 'output', 'options']
    assert r['task'] == task and r['options'] == options and r['output'] in options
    assert all(isinstance(r[k], str) and r[k] for k in ('input', 'output'))
    assert r['input'] == ' '.join(r['input'].split())
    assert all(o in S.LABEL_WORDS for o in options)


def test_deterministic(tmp_path):
  a, b, c = (str(tmp_path / n) for n in 'abc')
  assert S.write_suite(a, seed=3, **SMALL) == S.write_suite(b, seed=3, **SMALL)
  fa, fb = all_files(a), all_files(b)
  assert fa == fb
  S.write_suite(c, seed=4, **SMALL)
  fc = all_files(c)
  assert set(fc) == set(fa)
  differ = [k for k in fa if k.endswith('.jsonl') and fa[k] != fc[k]]
  assert len(differ) == sum(k.endswith('.jsonl') for k in fa)  # every data file changes


def test_test_tasks_independent_of_meta_train_size(tmp_path):
  a = S.write_suite(str(tmp_path / 'a'), seed=0, **SMALL)
  b = S.write_suite(str(tmp_path / 'b'), seed=0, **{**SMALL, 'n_train_tasks': 3})
  assert a['test'] == b['test']
  t = a['test'][0]
  rel = f'{t}/{t}_16_42_train.jsonl'
  assert all_files(str(tmp_path / 'a'))[rel] == all_files(str(tmp_path / 'b'))[rel]


def test_idempotent(tmp_path):
  d = str(tmp_path / 's')
  s1 = S.write_suite(d, seed=0, **SMALL)
  mtimes = {p: os.stat(os.path.join(d, p)).st_mtime_ns for p in all_files(d)}
  s2 = S.write_suite(d, seed=0, **SMALL)
  assert s1 == s2
  assert {p: os.stat(os.path.join(d, p)).st_mtime_ns for p in all_files(d)} == mtimes

  # Different parameters rewrite; an interrupted write (no suite.json) is not accepted.
  s3 = S.write_suite(d, seed=0, **{**SMALL, 'n_test_examples': 16})
  t = s3['test'][0]
  assert len(read_jsonl(os.path.join(d, t, f'{t}_16_13_test.jsonl'))) == 16
  os.remove(os.path.join(d, 'suite.json'))
  os.remove(os.path.join(d, t, f'{t}_16_13_test.jsonl'))
  assert S.write_suite(d, seed=0, **SMALL) == s1
  assert len(read_jsonl(os.path.join(d, t, f'{t}_16_13_test.jsonl'))) == SMALL['n_test_examples']


def test_tokenizer(suite, tok, tmp_path):
  assert len(tok) == len(S.VOCAB) and 200 <= len(tok) <= 400
  assert tok.convert_ids_to_tokens(list(range(3))) == ['<|endoftext|>', '[UNK]', '\n']
  assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
  assert tok.unk_token_id == 1 and tok.model_max_length == 1024
  assert S.build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic ids

  pre = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str('a b\n\n\nc')
  assert [w for w, _ in pre] == ['a', 'b', '\n', '\n', '\n', 'c']
  # A newline directly before a label word is one token with it (the answer follows its cue).
  assert tok.tokenize('the cat\n\n\nred') == ['the', 'cat', '\n', '\n', '\nred']
  assert tok.tokenize('cat\nred\n\n\ndog\nblue') == ['cat', '\nred', '\n', '\n', '\n', 'dog',
                                                  '\nblue']
  assert tok.tokenize('cat\nreddish') == ['cat', '\n', '[UNK]']  # a whole label word only
  assert tok.tokenize(' the \t cat \n red\n') == ['the', 'cat', '\n', 'red', '\n']
  ids = tok('the cat\n\n\nred')['input_ids']
  assert ids == tok('the cat\n\n\nred', add_special_tokens=False)['input_ids']  # nothing added
  assert len(ids) == 5 and 0 not in ids and tok.unk_token_id not in ids
  assert tok.decode(ids).split() == ['the', 'cat', 'red'] and tok.decode(ids).count('\n') == 3
  assert tok.decode(tok('red cat dog')['input_ids']) == 'red cat dog'
  assert tok('zebraish')['input_ids'] == [tok.unk_token_id]

  tok.save_pretrained(tmp_path / 'tok')  # round-trips through the usual loader
  import transformers
  again = transformers.AutoTokenizer.from_pretrained(tmp_path / 'tok')
  assert again('the cat\n\n\nred')['input_ids'] == ids

  d, setting = suite
  paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith('.jsonl')]
  for p in paths:
    for r in read_jsonl(p):
      for text in [r['input'], *r['options']]:
        assert tok.unk_token_id not in tok(text)['input_ids'], text
      assert all(len(tok(o)['input_ids']) == 1 for o in r['options'])
      # MetaICL's direct format: input, newline, output (the newline joins the output's token).
      n = len(tok(r['input'] + '\n' + r['output'])['input_ids'])
      assert n == len(r["input"].split()) + 1 and 3 <= n <= 5


def test_solvable_only_from_examples(tmp_path):
  d = str(tmp_path / 's')
  setting = S.write_suite(d, seed=0, n_train_tasks=8, n_test_tasks=8, n_train_examples=64,
                          n_test_examples=64)
  mappings = {}
  for t in setting['test']:
    test_rows = read_jsonl(os.path.join(d, t, f'{t}_16_100_test.jsonl'))
    for s in S.SEEDS:
      shots = read_jsonl(os.path.join(d, t, f'{t}_16_{s}_train.jsonl'))
      rule = {}
      for r in shots:
        k = key_of(t, r['input'])
        assert rule.setdefault(k, r['output']) == r['output']  # consistent within the task
      # Every key of the task appears in the 16 examples, so the rule read from them is exact.
      acc = sum(rule.get(key_of(t, r['input'])) == r['output'] for r in test_rows) / len(test_rows)
      assert acc == 1.0, (t, s, acc)
      mappings.setdefault(t, rule)
    # Without the examples: the majority label is at chance (balanced classes).
    counts = collections.Counter(r['output'] for r in test_rows)
    assert max(counts.values()) / len(test_rows) <= 1 / len(counts) + 1 / len(test_rows)

  # last_word needs the position: "any known cue in the input" is ambiguous for many examples.
  for t in (t for t in setting['test'] if t.startswith('last_word')):
    rule = mappings[t]
    rows = read_jsonl(os.path.join(d, t, f'{t}_16_100_test.jsonl'))
    ambiguous = sum(len({rule[w] for w in r['input'].split() if w in rule}) > 1 for r in rows)
    assert ambiguous >= len(rows) // 5, (t, ambiguous)

  for t in setting['train']:
    rows = read_jsonl(os.path.join(d, t, f'{t}_16384_100_train.jsonl'))
    rule = {}
    for r in rows:
      k = key_of(t, r['input'])
      assert rule.setdefault(k, r['output']) == r['output']
    mappings[t] = rule

  # The mapping is per task: words shared by two tasks map to different labels somewhere,
  # and each test task's mapping is new (no test task copies a meta-train task's mapping).
  by_word = collections.defaultdict(set)
  for t, rule in mappings.items():
    for w, lab in rule.items():
      by_word[w].add(lab)
  assert sum(len(labs) > 1 for labs in by_word.values()) >= 2
  train_maps = [set(mappings[t].items()) for t in setting['train']]
  for t in setting['test']:
    m = set(mappings[t].items())
    assert all(len(m & tm) <= 1 for tm in train_maps), t
  # Label words are drawn per task too: the option sets are not all the same.
  opts = {tuple(read_jsonl(os.path.join(d, t, f'{t}_16_13_test.jsonl'))[0]['options'])
          for t in setting['test']}
  assert len(opts) == len(setting['test'])


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError):
    S.write_suite(str(tmp_path / 'x'), n_train_examples=0)
  with pytest.raises(ValueError):
    S.write_suite(str(tmp_path / 'x'), n_test_tasks=-1)
