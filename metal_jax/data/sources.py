"""Task sources: an HF or TFDS classification dataset -> MetaICL task files (prepare_data.py).

`convert` writes, under `out/{task}/`, MetaICL's files for one task:

* `{task}_16384_100_train.jsonl`: the meta-train file, up to `max_meta_train` examples of the
  train split (all of them if fewer), in a seeded random order;
* for each seed s (MetaICL's 100, 13, 21, 42, 87), `{task}_{k}_{s}_train.jsonl`: k examples of
  the train split drawn with seed s, and `{task}_{k}_{s}_test.jsonl`: the test split (or a seeded
  sample of `max_test` of it, the same for every seed, in the split's order) without the
  examples whose input equals the input of one of that seed's k train examples (MetaICL's
  train/test overlap removal).

Each line is {"task", "input", "output", "options"}: the input is one column's text, or several
columns' joined by spaces or formatted by a Python template ("{premise} question:
{hypothesis}"); the options are every label word of the task in a fixed order (ClassLabel
names, or the values of a --label_map in the order given) and the output is the example's own.
Examples whose input is empty are skipped (counted in the summary).

Randomness: `np.random.default_rng([seed, stream])` with stream 0 for the meta-train order
(seed 100), 1 for the k-shot draws (seed s) and 2 for the test sample (seed 0): the same source
and arguments give byte-identical files. Every file is written to a temporary name in its
directory and renamed (os.replace), so a reader never sees half a file.

Sources:

* `hf`: a `save_to_disk` directory (datasets.load_from_disk), local data files (`a.jsonl`,
  `a.csv`, `a.parquet`, globs, several separated by commas, `SPLIT=FILES` to name their split;
  files without a split name are the split "train"), or a hub id `ID[:CONFIG]`
  (datasets.load_dataset, where there is a network). Split names may carry HF slices
  (`train[:80%]`) for data files and hub ids.
* `tfds`: a prepared TFDS dataset `NAME[/CONFIG][:VERSION]` in `tfds_data_dir`, read by random
  access through `tfds.data_source` (array_record files; TensorFlow is not needed). Splits may
  carry TFDS slices (`train[:80%]`).

Mistakes (a missing column or split, a label outside the map, too few examples) raise
tasks.DataError naming the flag of prepare_data.py and the column or value.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from typing import Sequence

import numpy as np

from metal_jax import atomic
from metal_jax.data.tasks import META_TRAIN_K, META_TRAIN_SEED, DataError, task_file

SEEDS = (100, 13, 21, 42, 87)  # MetaICL's few-shot seeds
K = 16
STREAM_META_TRAIN, STREAM_FEW_SHOT, STREAM_TEST = 0, 1, 2
DATA_FILE_KINDS = {'.jsonl': 'json', '.json': 'json', '.csv': 'csv', '.parquet': 'parquet'}


# ----------------------------------------------------------------------------- arguments


def parse_columns(text: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(text, str):
    text = text.split(',')
  return tuple(c.strip() for c in text if c.strip())


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
  items = [s.strip() for s in text.split(',') if s.strip()] if isinstance(text, str) else list(text)
  try:
    seeds = tuple(int(s) for s in items)
  except ValueError:
    raise DataError(f'--seeds={text!r}: integers separated by commas, e.g. 100,13,21,42,87'
                    ) from None
  if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
    raise DataError(f'--seeds={text!r}: seeds must be distinct and >= 0')
  return seeds


def parse_label_map(text: str | dict | None) -> dict[str, str] | None:
  """'0:negative,1:positive' (or a JSON object, or a dict) -> {'0': 'negative', '1': 'positive'};
  '' -> None. Keys are matched against a label's value (str()) and, for a ClassLabel, its name."""
  if text is None or (isinstance(text, str) and not text.strip()):
    return None
  if isinstance(text, str) and text.lstrip().startswith('{'):
    try:
      text = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'--label_map: invalid JSON ({e.msg})') from None
  if isinstance(text, dict):
    pairs = [(str(k), str(v)) for k, v in text.items()]
  else:
    pairs = []
    for item in text.split(','):
      if not item.strip():
        continue
      key, sep, word = item.partition(':')
      if not sep:
        raise DataError(f'--label_map={text!r}: {item.strip()!r} is not LABEL:WORD '
                        '(e.g. 0:negative,1:positive)')
      pairs.append((key.strip(), word.strip()))
  out = {}
  for key, word in pairs:
    if not key or not word:
      raise DataError(f'--label_map: {key!r}:{word!r} needs a label and a word')
    if key in out:
      raise DataError(f'--label_map: label {key!r} is mapped twice')
    out[key] = word
  return out


def _check_task_name(task: str) -> None:
  if not task or task in ('.', '..') or '/' in task or os.sep in task or task != task.strip():
    raise DataError(f'--task={task!r}: a task name (a directory name: no "/", not empty)')


# ----------------------------------------------------------------------------- splits


class _Split:
  """One split of a source: its length, column names, label names, and rows by index."""

  def __init__(self, name: str, n: int, columns: Sequence[str], label_names: dict[str, list],
               read):
    self.name, self.n, self.columns = name, n, list(columns)
    self.label_names = label_names  # column -> ClassLabel names (only ClassLabel columns)
    self._read = read  # list of indices -> list of {column: value}

  def rows(self, indices: Sequence[int]) -> list[dict]:
    return self._read([int(i) for i in indices]) if len(indices) else []


def _hf_split(ds, name: str, columns: Sequence[str]) -> _Split:
  import datasets
  names = {c: list(f.names) for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
  present = [c for c in columns if c in ds.column_names]
  view = ds.select_columns(present) if present else ds

  def read(idx):
    cols = view[idx]
    return [{c: cols[c][i] for c in present} for i in range(len(idx))]
  return _Split(name, len(ds), ds.column_names, names, read)


def _data_files(path: str):
  """(loader kind, data_files) if `path` names local data files, else None."""
  entries = [e.strip() for e in path.split(',') if e.strip()]
  files: dict[str, list[str]] = {}
  kinds = set()
  for e in entries:
    split, sep, f = e.partition('=')
    if not sep:
      split, f = 'train', e
    ext = os.path.splitext(f)[1].lower()
    if ext not in DATA_FILE_KINDS:
      return None
    kinds.add(DATA_FILE_KINDS[ext])
    files.setdefault(split.strip(), []).append(os.path.expanduser(f.strip()))
  if not files:
    return None
  if len(kinds) > 1:
    raise DataError(f'--path={path!r}: data files of one kind only (json, csv or parquet), '
                    f'got {sorted(kinds)}')
  return kinds.pop(), files


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, f)) for f in ('dataset_dict.json', 'state.json'))


def _open_hf(path: str, splits: dict[str, str], columns, cache_dir: str) -> dict[str, _Split]:
  """flag -> split of an HF source (save_to_disk directory, data files or hub id)."""
  import datasets
  datasets.disable_progress_bars()
  out = {}
  if _is_saved_dataset(path):
    try:
      obj = datasets.load_from_disk(path)
    except Exception as e:  # e.g. a split saved with no rows, which datasets cannot reload
      raise DataError(f'--path={path!r}: cannot load the saved dataset '
                      f'({type(e).__name__}: {" ".join(str(e).split())})') from e
    available = list(obj) if isinstance(obj, datasets.DatasetDict) else ['train']
    for flag, split in splits.items():
      if split not in available:
        raise DataError(f'--{flag}={split!r}: {path} has the splits {available}'
                        + (' (a saved Dataset without splits is the split "train")'
                           if not isinstance(obj, datasets.DatasetDict) else ''))
      ds = obj[split] if isinstance(obj, datasets.DatasetDict) else obj
      out[flag] = _hf_split(ds, split, columns)
    return out
  files = _data_files(path)
  for flag, split in splits.items():
    try:
      if files is not None:
        kind, data_files = files
        missing = [f for fs in data_files.values() for f in fs
                   if not any(ch in f for ch in '*?[') and not os.path.isfile(f)]
        if missing:
          raise DataError(f'--path={path!r}: {missing[0]}: no such file')
        ds = datasets.load_dataset(kind, data_files=data_files, split=split, cache_dir=cache_dir)
      else:
        name, _, config = path.partition(':')
        ds = datasets.load_dataset(name, config or None, split=split)
    except DataError:
      raise
    except (ValueError, StopIteration) as e:
      if files is not None and (isinstance(e, StopIteration) or 'corresponds to no data' in str(e)):
        raise DataError(f'--{flag}={split!r}: the split is empty (no rows in '
                        f'{", ".join(files[1].get(split.split("[")[0], []))})') from e
      if 'split' in str(e).lower():
        raise DataError(f'--{flag}={split!r}: not a split of --path={path!r} ({e})') from e
      raise DataError(f'--path={path!r}: {e}') from e
    except Exception as e:  # a hub id that cannot be fetched or read: the loader's own words
      raise DataError(f'--path={path!r}: cannot load it as an HF dataset '
                      f'({type(e).__name__}: {" ".join(str(e).split())})') from e
    out[flag] = _hf_split(ds, split, columns)
  return out


def _open_tfds(name: str, data_dir: str, splits: dict[str, str], columns) -> dict[str, _Split]:
  """flag -> split of a prepared TFDS dataset, read by random access (tfds.data_source)."""
  import tensorflow_datasets as tfds
  where = f'--tfds_data_dir={data_dir!r}' if data_dir else 'the default TFDS data directory'
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    info = builder.info
    if not builder.is_prepared():
      raise FileNotFoundError('not prepared')
  except Exception as e:
    why = ' '.join(str(e).split('Available datasets')[0].split())[:300].rstrip('. ')
    raise DataError(f'--path={name!r}: no prepared TFDS dataset of that name in {where} '
                    f'({type(e).__name__}: {why})') from e
  features = info.features
  names = {c: list(f.names) for c, f in features.items() if isinstance(f, tfds.features.ClassLabel)}
  out = {}
  for flag, split in splits.items():
    base = split.split('[')[0]
    if base not in info.splits:
      raise DataError(f'--{flag}={split!r}: {name} has the splits {list(info.splits)}')
    try:
      src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:
      raise DataError(f'--{flag}={split!r}: {name}: {type(e).__name__}: {e}') from e
    present = [c for c in columns if c in features]

    def read(idx, src=src, present=present):
      rows = src.__getitems__(idx) if hasattr(src, '__getitems__') else [src[i] for i in idx]
      return [{c: r[c] for c in present} for r in rows]
    out[flag] = _Split(split, len(src), list(features.keys()), names, read)
  return out


# ----------------------------------------------------------------------------- examples


def _text(value, column: str) -> str:
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      raise DataError(f'column {column!r}: not UTF-8 text (byte {e.start})') from None
  if isinstance(value, (list, tuple)):
    return ' '.join(_text(v, column) for v in value)
  return '' if value is None else str(value)


class _Mapper:
  """Rows -> (input, output) under the column mapping; options = every label word."""

  def __init__(self, split: _Split, input_cols, template, label, label_map):
    self.input_cols, self.template = input_cols, template
    self.label, self.label_map = label, label_map
    self.names = split.label_names.get(label)
    if label_map is not None:
      self.options = list(dict.fromkeys(label_map.values()))
    elif self.names is not None:
      self.options = list(self.names)
    else:
      raise DataError(f'--label={label!r}: the column is not a ClassLabel (no label names); '
                      'give the words with --label_map, e.g. --label_map=0:negative,1:positive')
    if len(self.options) < 2:
      flag = '--label_map' if label_map is not None else f'--label={label!r}'
      raise DataError(f'{flag}: {len(self.options)} label word(s) {self.options}; a '
                      'classification task needs two or more')

  def word(self, value, where: str) -> str:
    raw = value.item() if isinstance(value, np.generic) else value
    raw = raw.decode('utf-8') if isinstance(raw, bytes) else raw
    name = None
    if self.names is not None and isinstance(raw, (int, np.integer)) and 0 <= raw < len(self.names):
      name = self.names[raw]
    if self.label_map is None:
      if name is None:
        hint = (' (-1: an unlabelled example, as in GLUE\'s test splits; use a labelled split)'
                if raw == -1 else '')
        raise DataError(f'--label={self.label!r}: {where}: label {raw!r} is not one of the '
                        f'{len(self.names)} ClassLabel names{hint}')
      return name
    if str(raw) in self.label_map:
      return self.label_map[str(raw)]
    if name is not None and name in self.label_map:
      return self.label_map[name]
    shown = f'{raw!r}' + (f' ({name})' if name is not None else '')
    raise DataError(f'--label_map: {where}: label {shown} of column {self.label!r} is not in the '
                    f'map (keys {list(self.label_map)})')

  def example(self, row: dict, where: str) -> tuple[str, str]:
    values = {c: _text(row[c], c) for c in self.input_cols}
    if self.template:
      try:
        text = self.template.format(**values)
      except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise DataError(f'--template={self.template!r}: {type(e).__name__}: {e}') from None
    else:
      text = ' '.join(v.strip() for v in values.values() if v.strip())
    return text.strip(), self.word(row[self.label], where)


def _template_fields(template: str) -> list[str]:
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise DataError(f'--template={template!r}: {e}') from None
  fields = []
  for _, field, _, _ in parsed:
    if field is None:
      continue
    base = field.split('.')[0].split('[')[0]
    if not base or base.isdigit():
      raise DataError(f'--template={template!r}: fields must be column names ({{premise}}), '
                      f'not {{{field}}}')
    fields.append(base)
  return list(dict.fromkeys(fields))


def _take(split: _Split, mapper: _Mapper, order: np.ndarray, want: int) -> tuple[list, int]:
  """The first `want` examples of `order` (indices into split) with a non-empty input, as
  (index, input, output); and how many empty ones were passed over. Reads in chunks."""
  got, empty, pos = [], 0, 0
  chunk = max(64, min(want, 4096))
  while len(got) < want and pos < len(order):
    idx = order[pos:pos + chunk]
    pos += len(idx)
    for i, row in zip(idx, split.rows(idx)):
      x, y = mapper.example(row, f'split {split.name!r} row {int(i)}')
      if not x:
        empty += 1
        continue
      got.append((int(i), x, y))
      if len(got) == want:
        break
  return got, empty


# ----------------------------------------------------------------------------- files


def _write_jsonl(path: str, task: str, examples, options) -> int:
  rows = [json.dumps({'task': task, 'input': x, 'output': y, 'options': options}) + '\n'
          for _, x, y in examples]
  atomic.write(path, ''.join(rows))
  return len(rows)


def convert(*, source: str, path: str, task: str, out: str, tfds_data_dir: str = '',
            split_train: str = 'train', split_test: str = 'test', input: str | Sequence[str] = '',
            template: str = '', label: str = 'label', label_map=None, k: int = K,
            seeds: str | Sequence[int] = SEEDS, max_meta_train: int = META_TRAIN_K,
            max_test: int = 0) -> dict:
  """Writes one task's MetaICL files under out/task/ (see the module's docstring).

  split_test '' writes the meta-train file only (a task that is only ever meta-trained on).
  Returns a summary: {'task', 'dir', 'options', 'files': {file name: examples},
  'overlap_removed': {seed: test examples dropped}, 'empty_inputs_skipped'}.
  """
  if source not in ('hf', 'tfds'):
    raise DataError(f'--source={source!r}: hf or tfds')
  if not path:
    raise DataError('--path: the dataset to read (a directory, data files, a hub id or a TFDS '
                    'name)')
  _check_task_name(task)
  if not out:
    raise DataError('--out: the data directory to write the task into')
  for flag, v, lo in (('k', k, 1), ('max_meta_train', max_meta_train, 1),
                      ('max_test', max_test, 0)):
    if int(v) != v or v < lo:
      raise DataError(f'--{flag}={v!r}: an integer >= {lo}')
  if not split_train:
    raise DataError('--split_train: the split the meta-train and k-shot train examples come from')
  seeds = parse_seeds(seeds)
  label_map = parse_label_map(label_map)
  input_cols = parse_columns(input)
  fields = _template_fields(template) if template else []
  if not input_cols:
    input_cols = tuple(fields)
  if not input_cols:
    raise DataError('--input: the column(s) that make the input, e.g. --input=sentence or '
                    '--input=premise,hypothesis (or a --template naming them)')
  unused = [f for f in fields if f not in input_cols]
  if unused:
    raise DataError(f'--template={template!r}: fields {unused} are not --input columns '
                    f'{list(input_cols)}')
  needed = list(dict.fromkeys([*input_cols, label]))

  splits = {'split_train': split_train}
  if split_test:
    splits['split_test'] = split_test
  with tempfile.TemporaryDirectory(prefix='prepare_data_') as cache:
    opened = (_open_hf(path, splits, needed, cache) if source == 'hf'
              else _open_tfds(path, tfds_data_dir, splits, needed))
    for flag, split in opened.items():
      for col, what in [(c, '--input') for c in input_cols] + [(label, '--label')]:
        if col not in split.columns:
          raise DataError(f'{what}: no column {col!r} in split {split.name!r} (columns: '
                          f'{split.columns})')
      if split.n == 0:
        raise DataError(f'--{flag}={split.name!r}: the split is empty')
    train = opened['split_train']
    mapper = _Mapper(train, input_cols, template, label, label_map)
    if split_test:
      test_names = opened['split_test'].label_names.get(label)
      if label_map is None and test_names != mapper.names:
        raise DataError(f'--label={label!r}: the ClassLabel names differ between split '
                        f'{split_train!r} ({mapper.names}) and {split_test!r} ({test_names})')

    def rng(seed, stream):
      return np.random.default_rng([seed, stream])

    meta, empty = _take(train, mapper, rng(META_TRAIN_SEED, STREAM_META_TRAIN).permutation(train.n),
                        max_meta_train)
    if not meta:
      raise DataError(f'--split_train={split_train!r}: every input is empty (--input '
                      f'{list(input_cols)})')
    shots = {}
    if split_test:
      for s in seeds:
        shots[s], e = _take(train, mapper, rng(s, STREAM_FEW_SHOT).permutation(train.n), k)
        empty += e
        if len(shots[s]) < k:
          raise DataError(f'--split_train={split_train!r}: {len(shots[s])} examples with an input, '
                          f'fewer than --k={k}')
      test_split = opened['split_test']
      cap = max_test if max_test else test_split.n
      order = (np.arange(test_split.n) if cap >= test_split.n
               else rng(0, STREAM_TEST).permutation(test_split.n))
      tests, e = _take(test_split, mapper, order, cap)
      empty += e
      tests.sort(key=lambda t: t[0])  # the split's own order
      if not tests:
        raise DataError(f'--split_test={split_test!r}: every input is empty')

  # Everything is decided before the first file is written: a mistake leaves no files behind.
  contents = {task_file(out, task, META_TRAIN_K, META_TRAIN_SEED, 'train'): meta}
  overlap = {}
  for s, shot in shots.items():
    seen = {x for _, x, _ in shot}
    kept = [t for t in tests if t[1] not in seen]
    overlap[s] = len(tests) - len(kept)
    if not kept:
      raise DataError(f'--split_test={split_test!r}: every test input is among seed {s}\'s '
                      f'{k} train inputs')
    contents[task_file(out, task, k, s, 'train')] = shot
    contents[task_file(out, task, k, s, 'test')] = kept
  task_dir = os.path.join(out, task)
  os.makedirs(task_dir, exist_ok=True)
  files = {os.path.basename(p): _write_jsonl(p, task, examples, mapper.options)
           for p, examples in contents.items()}
  return {'task': task, 'dir': task_dir, 'options': mapper.options, 'files': files,
          'overlap_removed': overlap, 'empty_inputs_skipped': empty}
