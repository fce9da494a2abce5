"""MetaICL-format task files and settings.

A data directory holds `{task}/{task}_{k}_{seed}_{split}.jsonl`, one
{"task", "input", "output", "options"} object a line. A setting is MetaICL's
{"train": [tasks], "test": [tasks]}, optionally with "dirs": {task: directory}.
A TaskLocator finds each task's directory among several data directories
(searched in order; a task in two of them is an error) or in the setting's
"dirs". Files are validated line by line (the
error names the file and line), then read through HF `datasets` and tokenised
once: the tokenised examples are cached next to the run, keyed by the file's
content and the tokenizer, so a second run does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from metal_jax.errors import UserError

META_TRAIN_K, META_TRAIN_SEED = 16384, 100  # MetaICL's names for meta-training files
REQUIRED_KEYS = ('task', 'input', 'output', 'options')


class DataError(UserError):
  """Bad task data or settings; the message names the file (and line, or task)."""


def task_file(data_dir: str, task: str, k: int, seed: int, split: str) -> str:
  return os.path.join(data_dir, task, f'{task}_{k}_{seed}_{split}.jsonl')


def meta_train_file(data_dir: str, task: str) -> str:
  return task_file(data_dir, task, META_TRAIN_K, META_TRAIN_SEED, 'train')


def split_data_dirs(data_dir: str) -> list[str]:
  """`--config.data_dir`'s directories: one, or several separated by commas, in order (blanks and
  repeats dropped)."""
  return list(dict.fromkeys(d.strip() for d in data_dir.split(',') if d.strip()))


class TaskLocator:
  """Where a task's files are: data directories searched in order, and a per-task map.

  A task named in `dir_map` (a setting's "dirs") is read from that directory alone. Any other
  task is looked for as a subdirectory `{dir}/{task}` of each of `data_dirs`; one found in two
  of them is a DataError naming the task and both directories (keep one copy, or name the one
  to use in "dirs"); one found in none is a DataError naming the directories searched. With a
  single data directory and no map nothing is searched: paths are `task_file(dir, ...)` exactly
  (a missing file is reported by whoever reads it), and the locator is os.PathLike for that
  directory, so code that joins paths onto one data directory keeps working.
  """

  def __init__(self, data_dirs, dir_map: dict[str, str] | None = None):
    self.data_dirs = (data_dirs,) if isinstance(data_dirs, (str, os.PathLike)) else tuple(data_dirs)
    self.data_dirs = tuple(os.fspath(d) for d in self.data_dirs)
    self.dir_map = {t: os.fspath(d) for t, d in (dir_map or {}).items()}
    self._found: dict[str, str] = {}

  @classmethod
  def of(cls, where) -> 'TaskLocator':
    """A locator as is; a path (str / os.PathLike): that one directory (no comma splitting)."""
    return where if isinstance(where, cls) else cls(where)

  def dir(self, task: str) -> str:
    """The data directory holding task's files."""
    if task in self.dir_map:
      return self.dir_map[task]
    if task in self._found:
      return self._found[task]
    if len(self.data_dirs) == 1:
      return self.data_dirs[0]
    hits = [d for d in self.data_dirs if os.path.isdir(os.path.join(d, task))]
    if len(hits) > 1:
      raise DataError(f'task {task!r} is in two data directories, {hits[0]} and {hits[1]}: keep '
                      'one copy, or name the directory to use in the setting\'s "dirs"')
    if not hits:
      where = (f'data directories {", ".join(self.data_dirs)}' if self.data_dirs
               else 'no data directory (--config.data_dir is empty)')
      raise DataError(f'task {task!r}: no {task}/ in {where}, nor in the setting\'s "dirs"')
    self._found[task] = hits[0]
    return hits[0]

  def task_file(self, task: str, k: int, seed: int, split: str) -> str:
    return task_file(self.dir(task), task, k, seed, split)

  def meta_train_file(self, task: str) -> str:
    return meta_train_file(self.dir(task), task)

  def __fspath__(self) -> str:
    if len(self.data_dirs) == 1 and not self.dir_map:
      return self.data_dirs[0]
    raise TypeError(f'{self!r} is several directories, not one path: use .dir(task) or '
                    '.task_file(...)')

  def __str__(self) -> str:
    parts = list(self.data_dirs) + [f'{t}={d}' for t, d in sorted(self.dir_map.items())]
    return ','.join(parts)

  def __repr__(self) -> str:
    return f'TaskLocator({list(self.data_dirs)!r}, {self.dir_map!r})'

  def __eq__(self, other) -> bool:
    return (isinstance(other, TaskLocator) and self.data_dirs == other.data_dirs
            and self.dir_map == other.dir_map)

  def __hash__(self) -> int:
    return hash((self.data_dirs, tuple(sorted(self.dir_map.items()))))


def validate_jsonl(path: str) -> int:
  """Checks every line of a task file; returns the number of examples.

  Raises DataError naming the file and line for bad JSON, a missing or mistyped
  key, or an output that is not among its options; and for an empty file.
  """
  if not os.path.exists(path):
    raise DataError(f'{path}: task file not found')
  n = 0
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      where = f'{path}:{lineno}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(f'{where}: not UTF-8 (byte {e.start} of the line, '
                        f'{raw[e.start:e.start + 1]!r})') from None
      if not line.strip():
        continue
      try:
        dp = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{where}: invalid JSON ({e.msg})') from e
      if not isinstance(dp, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(dp).__name__}')
      for key in REQUIRED_KEYS:
        if key not in dp:
          raise DataError(f'{where}: missing key {key!r}')
      if not isinstance(dp['input'], str) or not isinstance(dp['output'], str):
        raise DataError(f'{where}: "input" and "output" must be strings')
      opts = dp['options']
      if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise DataError(f'{where}: "options" must be a list of strings')
      if opts and dp['output'] not in opts:
        raise DataError(f'{where}: output {dp["output"]!r} is not among its options {opts}')
      n += 1
  if n == 0:
    raise DataError(f'{path}: no examples (empty task file)')
  return n


def load_setting(path: str) -> dict[str, list[str]]:
  """A setting file ({"train": [...], "test": [...]}); refuses overlapping train/test tasks.

  Takes a path: shipped settings' names are resolved on the config side (configs.setting_path).
  An optional "dirs" ({task: directory}, relative paths from the setting file's directory) is
  returned as the absolute map under "dirs" (a TaskLocator's dir_map); without it the result
  has "train" and "test" only.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f'setting {str(path)!r}: no such file (a shipped setting\'s name such as '
                    f'cls2cls is resolved by train.py; the library takes a path)')
  try:
    setting = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: invalid JSON ({e})') from e
  for key in ('train', 'test'):
    tasks = setting.get(key)
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
      raise DataError(f'{path}: "{key}" must be a list of task names')
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
      raise DataError(f'{path}: "{key}" lists tasks more than once: {dup}')
  overlap = sorted(set(setting['train']) & set(setting['test']))
  if overlap:
    raise DataError(f'{path}: meta-train and test tasks must be disjoint; both list {overlap}')
  out = {'train': list(setting['train']), 'test': list(setting['test'])}
  if 'dirs' in setting:
    dirs = setting['dirs']
    if not isinstance(dirs, dict) or not all(isinstance(d, str) and d for d in dirs.values()):
      raise DataError(f'{path}: "dirs" must map task names to directories')
    unknown = sorted(set(dirs) - set(out['train']) - set(out['test']))
    if unknown:
      raise DataError(f'{path}: "dirs" names tasks that are in neither "train" nor "test": '
                      f'{unknown}')
    base = path.resolve().parent
    out['dirs'] = {t: str(base / os.path.expanduser(d)) for t, d in dirs.items()}
  return out


# ----------------------------------------------------------------------------- tokenisation


def tokenizer_fingerprint(tokenizer) -> str:
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def bos_token(tokenizer) -> int | None:
  """The BOS id the tokenizer puts first in tokenizer(text) (Llama's), or None (GPT-2's adds
  nothing). Tasks are tokenised in pieces without special tokens; EpisodeSpec.bos_id puts it
  back where transformers' own tokenisation has it, at the start of each sequence."""
  bos = getattr(tokenizer, 'bos_token_id', None)
  if bos is None:
    return None
  text = 'a b'
  plain = tokenizer(text, add_special_tokens=False)['input_ids']
  return bos if tokenizer(text)['input_ids'][:len(plain) + 1] == [bos] + plain else None


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()[:16]


def _tokenize_batch(batch, tokenizer, max_example_len):
  """MetaICL direct format, pieces tokenised once so episodes are concatenations.

  input_first: the input as the first example of a sequence; input_rest: with
  the three-newline separator; output and options: with their leading newline.
  Inputs are cut from the left so input + output fit max_example_len.
  """
  enc = lambda texts: tokenizer(texts, add_special_tokens=False)['input_ids']
  out_ids = enc(['\n' + o for o in batch['output']])
  first = enc(batch['input'])
  rest = enc(['\n\n\n' + x for x in batch['input']])
  flat_opts = [o for opts in batch['options'] for o in opts]
  flat_ids = enc(['\n' + o for o in flat_opts]) if flat_opts else []
  options, answer, pos = [], [], 0
  for opts, gold in zip(batch['options'], batch['output']):
    options.append(flat_ids[pos:pos + len(opts)])
    answer.append(opts.index(gold) if opts else -1)
    pos += len(opts)

  sep = enc(['\n\n\n'])[0]

  def cut(x, y, keep_prefix=0):
    """Drops input tokens from the left (after a kept separator) so input + output fit."""
    keep = max(max_example_len - len(y) - keep_prefix, 0)
    head, body = x[:keep_prefix], x[keep_prefix:]
    return head + (body[len(body) - keep:] if len(body) > keep else body)

  def sep_len(x):  # the separator's tokens, when the tokenizer kept them apart from the input
    return len(sep) if x[:len(sep)] == sep else 0

  return {'input_first': [cut(x, y) for x, y in zip(first, out_ids)],
          'input_rest': [cut(x, y, sep_len(x)) for x, y in zip(rest, out_ids)],
          'output_ids': [y[:max_example_len] for y in out_ids],
          'option_ids': options, 'answer': answer}


class TokenizedTask:
  """One task file's examples, tokenised: lists of int32 arrays per field."""

  def __init__(self, path: str, columns: dict, fingerprint: str = ''):
    self.path = path
    self.fingerprint = fingerprint  # content + tokenizer key ('' when built in memory)
    self.input_first = [np.asarray(x, np.int32) for x in columns['input_first']]
    self.input_rest = [np.asarray(x, np.int32) for x in columns['input_rest']]
    self.output_ids = [np.asarray(x, np.int32) for x in columns['output_ids']]
    self.option_ids = [[np.asarray(o, np.int32) for o in opts] for opts in columns['option_ids']]
    self.answer = np.asarray(columns['answer'], np.int32)
    self.raw = {k: columns[k] for k in ('input', 'output', 'options')}

  def __len__(self):
    return len(self.input_first)

  def subset(self, idx) -> 'TokenizedTask':
    """A new task of examples idx (in that order)."""
    out = object.__new__(TokenizedTask)
    out.path, out.fingerprint = self.path, self.fingerprint
    for name in ('input_first', 'input_rest', 'output_ids', 'option_ids'):
      setattr(out, name, [getattr(self, name)[i] for i in idx])
    out.answer = self.answer[np.asarray(idx, np.int64)]
    out.raw = {k: [v[i] for i in idx] for k, v in self.raw.items()}
    return out

  def truncate(self, n: int) -> None:
    """Keeps the first n examples (the paper caps meta-training tasks at 16,384)."""
    for name in ('input_first', 'input_rest', 'output_ids', 'option_ids'):
      setattr(self, name, getattr(self, name)[:n])
    self.answer = self.answer[:n]
    self.raw = {k: v[:n] for k, v in self.raw.items()}


def load_tokenized(path: str, tokenizer, cache_dir: str, max_example_len: int = 256) -> TokenizedTask:
  """Validates, reads (HF datasets, JSON lines) and tokenises a task file, cached in cache_dir."""
  import datasets
  datasets.disable_progress_bars()
  if not os.path.exists(path):
    raise DataError(f'{path}: task file not found')
  key = f'{_file_digest(path)}-{tokenizer_fingerprint(tokenizer)}-{max_example_len}'
  cache_file = os.path.join(cache_dir, f'{Path(path).stem}-{key}.arrow')
  if os.path.exists(cache_file):
    return TokenizedTask(path, datasets.Dataset.from_file(cache_file).to_dict(), key)
  validate_jsonl(path)  # only files that pass ever reach the cache
  os.makedirs(cache_dir, exist_ok=True)
  # datasets' own JSON cache is keyed by path and mtime, not content: give it a directory per
  # content key so that a file rewritten with its old mtime is never served stale.
  ds = datasets.load_dataset('json', data_files=path, split='train',
                             cache_dir=os.path.join(cache_dir, 'json', key))
  # A name of this writer's own: concurrent processes tokenising one file never share it.
  tmp = f'{cache_file}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  ds = ds.map(_tokenize_batch, batched=True, batch_size=1024, cache_file_name=tmp,
              load_from_cache_file=False, new_fingerprint=key,
              fn_kwargs={'tokenizer': tokenizer, 'max_example_len': max_example_len})
  columns = ds.to_dict()
  del ds
  try:
    check_tokens(path, columns)
  except DataError:
    os.remove(tmp)
    raise
  os.replace(tmp, cache_file)
  shutil.rmtree(os.path.join(cache_dir, 'json', key), ignore_errors=True)
  return TokenizedTask(path, columns, key)


def check_tokens(path: str, columns: dict) -> None:
  """Every example has input and output tokens (a zero-token one cannot be read or scored,
  e.g. under a mis-built tokenizer); the error names the file's line."""
  lines = None
  for i, (x, y) in enumerate(zip(columns['input_first'], columns['output_ids'])):
    if len(x) and len(y):
      continue
    if lines is None:  # the line numbers of the examples (blank lines are skipped)
      with open(path, 'rb') as f:
        lines = [n for n, raw in enumerate(f, 1) if raw.strip()]
    what = 'input' if not len(x) else 'output'
    raise DataError(f'{path}:{lines[i]}: the {what} tokenises to zero tokens (an empty string, or '
                    'a tokenizer that does not cover the text)')


def tokenize_examples(examples: list[dict], tokenizer, max_example_len: int = 256,
                      name: str = '<memory>') -> TokenizedTask:
  """In-memory examples ({'input', 'output'[, 'options']} each) tokenised as a task file's
  (MetaICL direct format): a served request's examples and queries."""
  options = [list(e.get('options', [])) for e in examples]
  # A query has no output: its first option stands in (only its input and options are used).
  outputs = [e['output'] if 'output' in e else (o[0] if o else '') for e, o in zip(examples, options)]
  columns = {'input': [e['input'] for e in examples], 'output': outputs, 'options': options}
  return TokenizedTask(name, {**columns, **_tokenize_batch(columns, tokenizer, max_example_len)})
