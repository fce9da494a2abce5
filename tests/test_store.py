"""The prompt store (serving/store.py): exact round trips, content-addressed ids, restart,
verification of damaged entries, identity and owner isolation, the LRU host cache, atomic writes
and concurrent registration."""

from __future__ import annotations

import json
import os
import threading
import time
import unicodedata

import jax.numpy as jnp
import numpy as np
import pytest

from metal_jax.models import KV
from metal_jax.pgm import Prompt
from metal_jax.serving import store as st

IDENTITY = {'pgm': {'run_dir': 'runs/a', 'step': 1000}, 'lm': 'gpt2-tiny', 'design': 'prefix',
            'split': [16, 4]}
EXAMPLES = [{'input': 'great film', 'output': 'positive'}, {'input': 'dull', 'output': 'negative'}]
L, P, K, H, D = 2, 3, 2, 4, 8


def kv_prompt(seed=0, dtype=np.float32) -> Prompt:
  rng = np.random.default_rng(seed)
  k, v = (rng.standard_normal((L, 1, P, K, H)).astype(np.float32) for _ in range(2))
  return Prompt(kv=KV(jnp.asarray(k, dtype), jnp.asarray(v, dtype), k_raw=jnp.zeros(3)))


def embeds_prompt(seed=0) -> Prompt:
  rng = np.random.default_rng(seed)
  return Prompt(embeds=rng.standard_normal((1, P, D)).astype(np.float32),
                tokens=rng.integers(0, 100, (1, P)).astype(np.int32))


def examples(i: int) -> list[dict]:
  return [{'input': f'text {i}', 'output': f'label {i}'}]


class Maker:
  """make_prompt that counts its calls."""

  def __init__(self, prompt_fn=kv_prompt, delay=0.0):
    self.calls, self.prompt_fn, self.delay = 0, prompt_fn, delay

  def __call__(self, canon):
    self.calls += 1
    assert canon == st.canonical_examples(canon)
    time.sleep(self.delay)
    return self.prompt_fn(self.calls)


def files(root) -> set[str]:
  return set(os.listdir(root))


def test_round_trip_kv_is_exact(tmp_path):
  s = st.PromptStore(tmp_path, IDENTITY)
  made = kv_prompt(seed=3)
  pid, created, pgm_ms = s.register(EXAMPLES, lambda _: made, task='sst2')
  assert created and pgm_ms >= 0 and files(tmp_path) == {f'{pid}.json', f'{pid}.safetensors'}
  got = st.PromptStore(tmp_path, IDENTITY).get(pid)  # from disk, not the cache
  assert got.embeds is None and got.tokens is None and got.kv.k_raw is None
  for a, b in ((got.kv.k, made.kv.k), (got.kv.v, made.kv.v)):
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (L, 1, P, K, H)
    np.testing.assert_array_equal(a.view(np.uint32), np.asarray(b).view(np.uint32))
  meta = json.loads((tmp_path / f'{pid}.json').read_text())
  assert meta['examples'] == EXAMPLES and meta['task'] == 'sst2' and meta['identity'] == IDENTITY
  assert meta['shapes'] == {'k': [L, 1, P, K, H], 'v': [L, 1, P, K, H]}
  assert set(meta['dtypes'].values()) == {'float32'} and meta['bytes'] == 2 * made.kv.k.nbytes


def test_round_trip_embeds_tokens_and_bfloat16(tmp_path):
  s = st.PromptStore(tmp_path, IDENTITY)
  made = embeds_prompt(seed=1)
  pid, _, _ = s.register(EXAMPLES, lambda _: made)
  got = st.PromptStore(tmp_path, IDENTITY).get(pid)
  assert got.kv is None and got.embeds.dtype == np.float32 and got.tokens.dtype == np.int32
  np.testing.assert_array_equal(got.embeds.view(np.uint32), made.embeds.view(np.uint32))
  np.testing.assert_array_equal(got.tokens, made.tokens)

  bf16 = kv_prompt(seed=2, dtype=jnp.bfloat16)
  pid2, _, _ = s.register(examples(1), lambda _: bf16)
  got = st.PromptStore(tmp_path, IDENTITY).get(pid2)
  assert got.kv.k.dtype == np.float32
  np.testing.assert_array_equal(got.kv.k, np.asarray(bf16.kv.k.astype(jnp.float32)))


def test_ids_are_content_hashes(tmp_path):
  s, make = st.PromptStore(tmp_path, IDENTITY), Maker()
  pid, created, ms = s.register(EXAMPLES, make)
  assert (pid, created, make.calls) == (st.prompt_id(IDENTITY, EXAMPLES), True, 1)
  assert s.register([dict(e) for e in EXAMPLES], make) == (pid, False, ms) and make.calls == 1
  other = {
      'order': st.prompt_id(IDENTITY, EXAMPLES[::-1]),
      'one char': st.prompt_id(IDENTITY, [EXAMPLES[0], {**EXAMPLES[1], 'output': 'negativE'}]),
      'whitespace': st.prompt_id(IDENTITY, [{**EXAMPLES[0], 'input': 'great film '}, EXAMPLES[1]]),
      'identity': st.prompt_id({**IDENTITY, 'pgm': {'run_dir': 'runs/a', 'step': 1001}}, EXAMPLES),
      'owner': st.prompt_id(IDENTITY, EXAMPLES, owner='bob')}
  assert len(set(other.values()) | {pid}) == len(other) + 1, other
  nfc, nfd = (unicodedata.normalize(f, 'café') for f in ('NFC', 'NFD'))
  assert nfc != nfd
  assert st.prompt_id(IDENTITY, [{'input': nfc, 'output': 'x'}]) == st.prompt_id(
      IDENTITY, [{'input': nfd, 'output': 'x'}])
  # Tuples and lists are the same JSON, so an identity built either way names the same prompts.
  assert st.prompt_id({**IDENTITY, 'split': (16, 4)}, EXAMPLES) == pid


def test_restart_serves_without_regenerating(tmp_path):
  make = Maker()
  pid, _, ms = st.PromptStore(tmp_path, IDENTITY).register(EXAMPLES, make, task='t')
  s = st.PromptStore(tmp_path, IDENTITY)
  assert s.register(EXAMPLES, make) == (pid, False, ms) and make.calls == 1
  np.testing.assert_array_equal(s.get(pid).kv.k, kv_prompt(1).kv.k)
  assert [m['id'] for m in s.list()] == [pid] and s.meta(pid)['task'] == 't'
  assert s.problems == []


def corrupt_flip(root, pid):
  path = root / f'{pid}.safetensors'
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF  # inside the tensor data: only the checksum can tell
  path.write_bytes(bytes(data))
  return path


def corrupt_truncate_json(root, pid):
  path = root / f'{pid}.json'
  path.write_text(path.read_text()[:40])
  return path


def corrupt_delete_tensors(root, pid):
  path = root / f'{pid}.safetensors'
  path.unlink()
  return path


def corrupt_shapes(root, pid):
  path = root / f'{pid}.json'
  meta = json.loads(path.read_text())
  meta['shapes']['k'] = [L, 1, P + 1, K, H]
  path.write_text(json.dumps(meta))
  return root / f'{pid}.safetensors'  # the tensors no longer match their metadata


@pytest.mark.parametrize('reopen', [True, False], ids=['after restart', 'while running'])
def test_corrupt_entries_are_reported_and_refused(tmp_path, reopen):
  s = st.PromptStore(tmp_path, IDENTITY, host_budget_bytes=0)  # every get reads the disk
  damage = [corrupt_flip, corrupt_truncate_json, corrupt_delete_tensors, corrupt_shapes]
  ids = [s.register(examples(i), Maker())[0] for i in range(len(damage) + 1)]
  bad_files = [fn(tmp_path, pid) for fn, pid in zip(damage, ids)]
  if reopen:
    s = st.PromptStore(tmp_path, IDENTITY, host_budget_bytes=0)
  for pid, path in zip(ids, bad_files):
    refused = st.UnknownPrompt if reopen and path.suffix == '.json' else st.CorruptEntry
    with pytest.raises(refused) as e:
      s.get(pid)
    if refused is st.CorruptEntry:
      assert str(path) in str(e.value)
      with pytest.raises(st.CorruptEntry):  # and stays refused
        s.get(pid)
  problems = dict(s.problems)
  assert set(problems) == {str(p) for p in bad_files}, problems
  assert 'sha256' in problems[str(bad_files[0])] and 'missing' in problems[str(bad_files[2])]
  np.testing.assert_array_equal(s.get(ids[-1]).kv.k, kv_prompt(1).kv.k)
  assert [m['id'] for m in s.list()] == [ids[-1]]
  # Re-registering a corrupt entry regenerates it, and it is served again.
  make = Maker()
  assert s.register(examples(0), make)[:2] == (ids[0], True) and make.calls == 1
  s.get(ids[0])
  assert str(bad_files[0]) not in dict(s.problems)


def test_incomplete_entries_and_stray_files_are_reported(tmp_path):
  s = st.PromptStore(tmp_path, IDENTITY)
  pid, _, _ = s.register(EXAMPLES, Maker())
  (tmp_path / f'{pid}.json').unlink()  # the write died before its commit marker
  (tmp_path / '.tmp-abc').write_bytes(b'x')
  s = st.PromptStore(tmp_path, IDENTITY)
  assert {os.path.basename(f) for f, _ in s.problems} == {f'{pid}.safetensors', '.tmp-abc'}
  with pytest.raises(st.UnknownPrompt):
    s.get(pid)


def test_identity_mismatch(tmp_path):
  pid, _, _ = st.PromptStore(tmp_path, IDENTITY).register(EXAMPLES, Maker())
  s = st.PromptStore(tmp_path, {**IDENTITY, 'lm': 'llama-tiny'})
  with pytest.raises(st.IdentityMismatch):
    s.get(pid)
  assert s.list() == [] and s.problems == []
  assert not isinstance(st.IdentityMismatch('x'), KeyError)  # the server answers 409, not 404


def test_owner_isolation(tmp_path):
  s = st.PromptStore(tmp_path, IDENTITY)
  pid_a, _, _ = s.register(EXAMPLES, Maker(), owner='alice')
  make_b = Maker()
  pid_b, created, _ = s.register(EXAMPLES, make_b, owner='bob')
  assert pid_b != pid_a and created and make_b.calls == 1  # no shared entry
  for op in (s.get, s.meta, s.delete):
    with pytest.raises(KeyError):
      op(pid_a, owner='bob')
    with pytest.raises(KeyError):
      op(pid_a)  # the default tenant is a tenant too
  assert [m['id'] for m in s.list('bob')] == [pid_b] and s.list() == []
  assert s.meta(pid_a, 'alice')['owner'] == 'alice'
  s.delete(pid_a, owner='alice')
  assert files(tmp_path) == {f'{pid_b}.json', f'{pid_b}.safetensors'}
  with pytest.raises(st.UnknownPrompt):
    s.get(pid_a, owner='alice')


def test_lru_evicts_from_memory_only(tmp_path):
  one = sum(x.nbytes for x in kv_prompt().kv[:2])
  s = st.PromptStore(tmp_path, IDENTITY, host_budget_bytes=2 * one)
  a, b, c = (s.register(examples(i), Maker())[0] for i in range(3))  # c evicts a
  assert s.evictions == 1
  s.get(b)  # b is now more recent than c
  assert (s.hits, s.misses) == (1, 0)
  got = s.get(a)  # reloaded from disk (a miss), evicting c
  np.testing.assert_array_equal(got.kv.k, kv_prompt(1).kv.k)
  assert (s.hits, s.misses, s.evictions) == (1, 1, 2)
  s.get(b)
  s.get(c)
  assert (s.hits, s.misses, s.evictions) == (2, 2, 3)
  assert len(files(tmp_path)) == 6


def test_writes_are_atomic_and_failures_write_nothing(tmp_path):
  s = st.PromptStore(tmp_path, IDENTITY)
  for i in range(3):
    s.register(examples(i), Maker())
  assert not [f for f in files(tmp_path) if not f.endswith(('.json', '.safetensors'))]

  def boom(_):
    raise RuntimeError('PGM failed')

  before = files(tmp_path)
  with pytest.raises(RuntimeError, match='PGM failed'):
    s.register(EXAMPLES, boom)
  assert files(tmp_path) == before
  make = Maker()
  assert s.register(EXAMPLES, make)[1] and make.calls == 1  # the failure was not remembered
  with pytest.raises(st.StoreError, match='batch 1'):
    s.register(examples(9), lambda _: Prompt(embeds=np.zeros((2, P, D), np.float32)))


def test_concurrent_registration_runs_the_pgm_once(tmp_path):
  s, make = st.PromptStore(tmp_path, IDENTITY), Maker(delay=0.05)
  barrier, results = threading.Barrier(8), []

  def worker():
    barrier.wait()
    results.append(s.register(EXAMPLES, make))

  threads = [threading.Thread(target=worker) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert make.calls == 1 and len({pid for pid, _, _ in results}) == 1
  assert sorted(created for _, created, _ in results) == [False] * 7 + [True]


@pytest.mark.parametrize('bad, message', [
    ([], r'examples: expected a non-empty list'),
    ([{'input': 'a', 'output': 'b'}, {'input': 'a'}], r'examples\[1\]\.output: missing'),
    ([{'input': 3, 'output': 'b'}], r'examples\[0\]\.input: expected a string'),
    (['ab'], r'examples\[0\]: expected an object'),
    ([{'input': 'a', 'output': 'b', 'label': 1}], r'examples\[0\]\.label: unexpected'),
])
def test_bad_examples(tmp_path, bad, message):
  make = Maker()
  with pytest.raises(st.StoreError, match=message):
    st.PromptStore(tmp_path, IDENTITY).register(bad, make)
  assert make.calls == 0 and files(tmp_path) == set()
