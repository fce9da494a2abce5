"""A persistent, content-addressed store of generated prompts for the LM service.

A task's few-shot examples go through the PGM once; the prompt it makes is kept on disk and in a
bounded host cache, and later requests name it by id.

Ids. `prompt_id` is the sha256 (first 32 hex chars) of the canonical JSON of
{"identity", "examples"[, "owner"]}: `identity` is what determines the prompt (PGM checkpoint, base
LM, design, split), examples are NFC-normalised but otherwise exact (order and whitespace matter:
the PGM reads them in order). The owner (tenant) is hashed in too, when non-empty, so two tenants
registering the same examples get different ids and never share, or learn of, each other's entry.

On disk, under `root`, an entry is two files:
  <id>.safetensors  tensors 'k', 'v' ([L, 1, P, K, H]) or 'embeds' ([1, P, D]), float32
                    (bfloat16 is widened exactly), and optionally 'tokens' ([1, P], int32)
  <id>.json         metadata: format, id, task, owner, created (UTC ISO 8601), identity,
                    examples (canonical), shapes, dtypes, bytes, pgm_ms, sha256 (of the
                    .safetensors file)

Guarantees.
* Writes are atomic (temporary file in root, fsync, os.replace), tensors first and JSON last: the
  JSON is the commit marker, so an interrupted write leaves at most an incomplete entry (tensors
  without JSON), which is reported in `problems` and never served.
* Every load from disk (first use, and again after a cache eviction) re-reads the JSON and checks
  it (fields, format, id = hash of its own identity/examples/owner), the tensor file's sha256 and
  its tensors' names, shapes and dtypes. A failing entry raises CorruptEntry, is reported in
  `problems` and is not served again until re-registered; other entries are unaffected.
* An entry made under another identity (another PGM checkpoint or base LM) raises
  IdentityMismatch rather than being served.
* An entry whose JSON cannot be read at start-up has no known owner, so it is unknown
  (UnknownPrompt) and reported in `problems`.
* Another owner's entry is indistinguishable from a missing one (UnknownPrompt, a KeyError).
"""

from __future__ import annotations

import collections
import copy
import datetime
import hashlib
import json
import os
import re
import threading
import time
import unicodedata
import weakref
from typing import Any, Callable

import numpy as np
import safetensors.numpy

from metal_jax import atomic
from metal_jax.models.layers import KV
from metal_jax.pgm import Prompt

FORMAT_VERSION = 1
ID_HEX = 32  # 128 bits: collisions are not a concern, and ids stay short in URLs
TMP_PREFIX = '.tmp-'
META_FIELDS = ('format', 'id', 'task', 'owner', 'created', 'identity', 'examples', 'shapes',
               'dtypes', 'bytes', 'pgm_ms', 'sha256')
TENSOR_DTYPES = {'k': 'float32', 'v': 'float32', 'embeds': 'float32', 'tokens': 'int32'}
_ID_RE = re.compile(f'[0-9a-f]{{{ID_HEX}}}')


class StoreError(ValueError):
  pass


class UnknownPrompt(StoreError, KeyError):
  """No such entry for this owner (missing, deleted, unreadable, or another tenant's)."""

  def __str__(self) -> str:  # KeyError would repr() the message
    return str(self.args[0]) if self.args else ''


class CorruptEntry(StoreError):
  """An entry's files fail verification; the message names the file and what is wrong."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path, self.reason = path, reason


class IdentityMismatch(StoreError):
  """The entry was made by another PGM / base LM than this store serves."""


def _canonical_json(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(',', ':'),
                    allow_nan=False)


def canonical_examples(examples) -> list[dict]:
  """Validated [{'input': str, 'output': str}, ...], NFC-normalised, order and whitespace kept."""
  if not isinstance(examples, (list, tuple)) or not examples:
    raise StoreError('examples: expected a non-empty list of {"input", "output"} objects')
  out = []
  for i, ex in enumerate(examples):
    if not isinstance(ex, dict):
      raise StoreError(f'examples[{i}]: expected an object with "input" and "output"')
    for field in ('input', 'output'):
      if field not in ex:
        raise StoreError(f'examples[{i}].{field}: missing')
      if not isinstance(ex[field], str):
        raise StoreError(f'examples[{i}].{field}: expected a string')
    extra = sorted(set(ex) - {'input', 'output'})
    if extra:
      raise StoreError(f'examples[{i}].{extra[0]}: unexpected field')
    out.append({f: unicodedata.normalize('NFC', ex[f]) for f in ('input', 'output')})
  return out


def prompt_id(identity: dict, examples, owner: str = '') -> str:
  """The content hash naming the prompt that `identity`'s PGM makes from `examples`.

  The owner joins the hash input only when non-empty, so the default tenant's id is exactly
  that of {"identity", "examples"}.
  """
  content = {'identity': identity, 'examples': canonical_examples(examples)}
  if owner:
    content['owner'] = owner
  return hashlib.sha256(_canonical_json(content).encode('utf-8')).hexdigest()[:ID_HEX]


def _host_tensors(prompt: Prompt) -> dict[str, np.ndarray]:
  """A batch-1 prompt's tensors as float32 / int32 numpy arrays (bfloat16 widens exactly)."""
  if (prompt.kv is None) == (prompt.embeds is None):
    raise StoreError('prompt: exactly one of kv and embeds must be set')
  if prompt.batch_size != 1:
    raise StoreError(f'prompt: a stored prompt has batch 1, got {prompt.batch_size}')
  tensors = ({'k': prompt.kv.k, 'v': prompt.kv.v} if prompt.kv is not None  # never k_raw
             else {'embeds': prompt.embeds})
  if prompt.tokens is not None:
    tensors['tokens'] = prompt.tokens
  return {name: np.ascontiguousarray(np.asarray(x, TENSOR_DTYPES[name]))
          for name, x in tensors.items()}


def _prompt_from(tensors: dict[str, np.ndarray]) -> Prompt:
  for x in tensors.values():
    x.flags.writeable = False  # shared by every caller through the cache
  kv = KV(tensors['k'], tensors['v']) if 'k' in tensors else None
  return Prompt(kv=kv, embeds=tensors.get('embeds'), tokens=tensors.get('tokens'))


def _arrays(prompt: Prompt) -> list[np.ndarray]:
  kv = [] if prompt.kv is None else [prompt.kv.k, prompt.kv.v]
  return [x for x in (*kv, prompt.embeds, prompt.tokens) if x is not None]


def _check_layout(names: set[str]) -> str | None:
  """What is wrong with a set of tensor names, or None."""
  core = names - {'tokens'}
  if core not in ({'k', 'v'}, {'embeds'}):
    return f'tensors {sorted(names)}: expected k and v, or embeds (and optionally tokens)'
  return None


def _fsync_dir(root: str) -> None:
  """Makes the renames durable (POSIX); best effort where directories can't be opened."""
  try:
    fd = os.open(root, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


class PromptStore:
  """Prompts on disk under `root`, with an LRU host cache of at most host_budget_bytes.

  Thread-safe: one RLock guards the index and cache; registration of one id is serialised by a
  per-id lock, so concurrent requests for the same examples run the PGM once, while different
  ids generate in parallel and reads never wait for a PGM.
  """

  def __init__(self, root: str, identity: dict, host_budget_bytes: int = 256 << 20):
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    # JSON-normalised (tuples -> lists), so it compares equal to identities read back from disk.
    self.identity = json.loads(_canonical_json(identity))
    self.host_budget_bytes = host_budget_bytes
    self.hits = self.misses = self.evictions = 0
    self._lock = threading.RLock()
    self._id_locks: weakref.WeakValueDictionary[str, threading.Lock] = (
        weakref.WeakValueDictionary())
    self._index: dict[str, dict] = {}  # id -> metadata of committed entries (JSON read)
    self._bad: dict[str, CorruptEntry] = {}  # id -> why verification failed; never served
    self._problems: dict[str, str] = {}  # file -> message
    self._cache: collections.OrderedDict[str, tuple[Prompt, int]] = collections.OrderedDict()
    self._cached_bytes = 0
    self._scan()

  # ---- public API

  @property
  def problems(self) -> list[tuple[str, str]]:
    """(file, message) for corrupt, incomplete or unreadable entries found so far."""
    with self._lock:
      return sorted(self._problems.items())

  def register(self, examples, make_prompt: Callable[[list[dict]], Prompt], *, task: str = '',
               owner: str = '') -> tuple[str, bool, float]:
    """(id, created, pgm_ms); make_prompt(canonical examples) runs only if no valid entry exists."""
    canon = canonical_examples(examples)
    pid = prompt_id(self.identity, canon, owner)
    with self._id_lock(pid):
      with self._lock:
        if pid in self._index and pid not in self._bad:
          try:
            self._prompt(pid)  # verifies it (and warms the cache for the requests to follow)
            return pid, False, self._index[pid]['pgm_ms']
          except CorruptEntry:
            pass  # regenerated below, replacing the bad files
      start = time.perf_counter()
      tensors = _host_tensors(make_prompt(copy.deepcopy(canon)))  # includes device -> host
      pgm_ms = (time.perf_counter() - start) * 1e3
      meta = self._write(pid, tensors, canon, task=task, owner=owner, pgm_ms=pgm_ms)
      with self._lock:
        self._forget(pid)
        self._index[pid] = meta
        self._cache_put(pid, _prompt_from(tensors))
    return pid, True, pgm_ms

  def get(self, pid: str, owner: str = '') -> Prompt:
    """The host-resident (numpy, read-only) prompt."""
    with self._lock:
      self._lookup(pid, owner)
      return self._prompt(pid)

  def meta(self, pid: str, owner: str = '') -> dict:
    with self._lock:
      return copy.deepcopy(self._lookup(pid, owner))

  def list(self, owner: str = '') -> list[dict]:
    """Metadata of this owner's servable entries (this identity, not known to be corrupt)."""
    with self._lock:
      metas = [m for pid, m in self._index.items()
               if m['owner'] == owner and pid not in self._bad and m['identity'] == self.identity]
      return copy.deepcopy(sorted(metas, key=lambda m: (m['created'], m['id'])))

  def delete(self, pid: str, owner: str = '') -> None:
    """Removes the entry's files (a corrupt entry may be deleted too)."""
    with self._id_lock(pid), self._lock:
      self._owned(pid, owner)
      for path in (self._path(pid, '.json'), self._path(pid, '.safetensors')):
        try:  # JSON first: if interrupted, what is left is an incomplete entry, never served
          os.unlink(path)
        except FileNotFoundError:
          pass
      _fsync_dir(self.root)
      self._forget(pid)
      del self._index[pid]

  # ---- index

  def _path(self, pid: str, ext: str) -> str:
    return os.path.join(self.root, pid + ext)

  def _id_lock(self, pid: str) -> threading.Lock:
    with self._lock:
      lock = self._id_locks.get(pid)
      if lock is None:
        lock = self._id_locks[pid] = threading.Lock()
      return lock

  def _scan(self) -> None:
    names = set(os.listdir(self.root))
    for name in sorted(names):
      stem, ext = os.path.splitext(name)
      path = os.path.join(self.root, name)
      if name.startswith(TMP_PREFIX):
        self._problems[path] = 'leftover temporary file of an interrupted write'
      elif not _ID_RE.fullmatch(stem):
        continue
      elif ext == '.safetensors' and stem + '.json' not in names:
        self._problems[path] = 'incomplete entry: no metadata JSON (interrupted write?)'
      elif ext == '.json':
        try:
          self._index[stem] = self._read_meta(stem)
        except CorruptEntry as e:
          self._problems[e.path] = e.reason
          continue
        if stem + '.safetensors' not in names:
          self._mark_bad(stem, CorruptEntry(self._path(stem, '.safetensors'), 'missing'))

  def _owned(self, pid: str, owner: str) -> dict:
    meta = self._index.get(pid) if isinstance(pid, str) else None
    if meta is None or meta['owner'] != owner:
      raise UnknownPrompt(f'unknown prompt id {pid!r}')
    return meta

  def _lookup(self, pid: str, owner: str) -> dict:
    """This owner's entry's metadata, unless it is known to be corrupt."""
    meta = self._owned(pid, owner)
    if pid in self._bad:
      err = self._bad[pid]
      raise CorruptEntry(err.path, err.reason)
    return meta

  def _mark_bad(self, pid: str, err: CorruptEntry) -> None:
    self._problems[err.path] = err.reason
    self._bad[pid] = err
    self._uncache(pid)

  def _forget(self, pid: str) -> None:
    """Drops what is known about pid's files (before rewriting or after deleting them)."""
    self._bad.pop(pid, None)
    self._uncache(pid)
    for ext in ('.json', '.safetensors'):
      self._problems.pop(self._path(pid, ext), None)

  # ---- cache

  def _prompt(self, pid: str) -> Prompt:
    """From the cache, or loaded and verified from disk (the caller holds the lock)."""
    if pid in self._cache:
      self.hits += 1
      self._cache.move_to_end(pid)
      return self._cache[pid][0]
    self.misses += 1
    try:
      prompt = self._load(pid)
    except CorruptEntry as e:
      self._mark_bad(pid, e)
      raise
    self._cache_put(pid, prompt)
    return prompt

  def _cache_put(self, pid: str, prompt: Prompt) -> None:
    nbytes = sum(x.nbytes for x in _arrays(prompt))
    self._uncache(pid)
    if nbytes > self.host_budget_bytes:
      return  # larger than the whole budget: served from disk every time
    self._cache[pid] = (prompt, nbytes)
    self._cached_bytes += nbytes
    while self._cached_bytes > self.host_budget_bytes:
      _, (_, dropped) = self._cache.popitem(last=False)
      self._cached_bytes -= dropped
      self.evictions += 1

  def _uncache(self, pid: str) -> None:
    entry = self._cache.pop(pid, None)
    if entry is not None:
      self._cached_bytes -= entry[1]

  # ---- files

  def _write(self, pid: str, tensors: dict[str, np.ndarray], examples: list[dict], *,
             task: str, owner: str, pgm_ms: float) -> dict:
    data = safetensors.numpy.save(tensors)
    meta = {
        'format': FORMAT_VERSION, 'id': pid, 'task': task, 'owner': owner,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'identity': self.identity, 'examples': examples,
        'shapes': {n: list(x.shape) for n, x in tensors.items()},
        'dtypes': {n: str(x.dtype) for n, x in tensors.items()},
        'bytes': sum(x.nbytes for x in tensors.values()), 'pgm_ms': pgm_ms,
        'sha256': hashlib.sha256(data).hexdigest()}
    # In the root, durable, named TMP_PREFIX... (a crash's leftovers are recognised and removed)
    atomic.write(self._path(pid, '.safetensors'), data, durable=True, tmp_prefix=TMP_PREFIX)
    atomic.write(self._path(pid, '.json'),  # last: commits the entry
                 json.dumps(meta, ensure_ascii=False, indent=1), durable=True,
                 tmp_prefix=TMP_PREFIX)
    _fsync_dir(self.root)
    return meta

  def _read_meta(self, pid: str) -> dict:
    """The entry's JSON, checked for form and against its own id; CorruptEntry otherwise."""
    path = self._path(pid, '.json')
    try:
      with open(path, encoding='utf-8') as f:
        meta = json.load(f)
    except FileNotFoundError:
      raise CorruptEntry(path, 'missing') from None
    except (OSError, ValueError) as e:  # unreadable, bad UTF-8 or bad JSON
      raise CorruptEntry(path, f'unreadable metadata ({e})') from None
    if not isinstance(meta, dict):
      raise CorruptEntry(path, 'metadata is not a JSON object')
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
      raise CorruptEntry(path, f'metadata lacks {missing}')
    if meta['format'] != FORMAT_VERSION:
      raise CorruptEntry(path, f'format {meta["format"]!r}, this store reads {FORMAT_VERSION}')
    if not (isinstance(meta['shapes'], dict) and isinstance(meta['dtypes'], dict)
            and set(meta['shapes']) == set(meta['dtypes'])):
      raise CorruptEntry(path, 'shapes and dtypes must name the same tensors')
    layout = _check_layout(set(meta['shapes']))
    if layout:
      raise CorruptEntry(path, layout)
    try:  # the id is a hash of the JSON's own content: catches edits to owner or examples
      expected = prompt_id(meta['identity'], meta['examples'], meta['owner'])
    except (StoreError, TypeError, ValueError) as e:
      raise CorruptEntry(path, f'bad identity, examples or owner ({e})') from None
    if meta['id'] != pid or expected != pid:
      raise CorruptEntry(path, f'id {meta["id"]!r} does not match its file name and content')
    return meta

  def _load(self, pid: str) -> Prompt:
    """Reads and verifies the entry against its (freshly re-read) JSON."""
    meta = self._read_meta(pid)
    if meta['owner'] != self._index[pid]['owner']:  # unreachable unless the id hash collides
      raise CorruptEntry(self._path(pid, '.json'), 'owner changed on disk')
    self._index[pid] = meta
    if meta['identity'] != self.identity:
      raise IdentityMismatch(
          f'prompt {pid} was made by {meta["identity"]}, this store serves {self.identity}')
    path = self._path(pid, '.safetensors')
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      raise CorruptEntry(path, 'missing') from None
    except OSError as e:
      raise CorruptEntry(path, f'unreadable ({e})') from None
    if hashlib.sha256(data).hexdigest() != meta['sha256']:
      raise CorruptEntry(path, 'sha256 does not match the metadata (file altered or damaged)')
    try:
      tensors = safetensors.numpy.load(data)
    except Exception as e:  # SafetensorError has no importable public base
      raise CorruptEntry(path, f'not a readable safetensors file ({e})') from None
    found = {n: (list(x.shape), str(x.dtype)) for n, x in tensors.items()}
    want = {n: (meta['shapes'][n], meta['dtypes'][n]) for n in meta['shapes']}
    if found != want:
      raise CorruptEntry(path, f'tensors {found} do not match the metadata {want}')
    bad_dtype = {n: d for n, (_, d) in found.items() if d != TENSOR_DTYPES[n]}
    if bad_dtype:
      raise CorruptEntry(path, f'dtypes {bad_dtype}: expected {TENSOR_DTYPES}')
    return _prompt_from(tensors)
