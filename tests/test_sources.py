"""Task sources (metal_jax/data/sources.py, prepare_data.py) and several data directories
(tasks.TaskLocator, experiment.data_location).

The sources are built here, small and by hand: an HF DatasetDict saved to disk, the same data
as jsonl and csv files, and a TFDS dataset written as array_record files (no TensorFlow). Every
expectation is computed from how the data was built: the train split has N_TRAIN examples with
distinct inputs; the HF test split is N_NEW new inputs followed by every train input again, so
whatever 16 a seed draws, exactly 16 test examples overlap and each test file holds
N_NEW + N_TRAIN - 16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_config, tiny_run_model
from metal_jax import evaluation, experiment, run_train
from metal_jax.data import sources, synthetic
from metal_jax.data.tasks import DataError, TaskLocator, load_tokenized, validate_jsonl

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (100, 13, 21, 42, 87)
K = 16
N_TRAIN, N_NEW = 40, 10


def text(i: int) -> str:
  """The i-th input: words of the built-in tokenizer's vocabulary, distinct for distinct i."""
  return f'{synthetic.FILLER_WORDS[i % 7]} {synthetic.CONTENT_WORDS[i]}'


TRAIN_IDS = list(range(N_TRAIN))
HF_TEST_IDS = list(range(N_TRAIN, N_TRAIN + N_NEW)) + TRAIN_IDS  # new inputs, then every train one
TFDS_TEST_IDS = list(range(N_TRAIN, N_TRAIN + N_NEW))  # new inputs only: no overlap
LABEL_OF = {text(i): i % 2 for i in range(N_TRAIN + N_NEW)}


def read(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def check_task(out, task, words, test_ids, max_meta_train=16384):
  """The files of a converted task against the expectation; returns {file name: rows}."""
  d = os.path.join(out, task)
  meta = f'{task}_16384_100_train.jsonl'
  want = {meta} | {f'{task}_{K}_{s}_{sp}.jsonl' for s in SEEDS for sp in ('train', 'test')}
  assert set(os.listdir(d)) == want, 'exactly the MetaICL files, no temporary file left'
  rows = {name: read(os.path.join(d, name)) for name in sorted(want)}
  for name, rs in rows.items():
    assert validate_jsonl(os.path.join(d, name)) == len(rs)
    for r in rs:
      assert list(r) == ['task', 'input', 'output', 'options']
      assert r['task'] == task and r['options'] == words
      assert r['output'] == words[LABEL_OF[r['input']]], 'the example\'s own label word'
  train_inputs = {text(i) for i in TRAIN_IDS}
  meta_inputs = [r['input'] for r in rows[meta]]
  assert len(meta_inputs) == min(N_TRAIN, max_meta_train) == len(set(meta_inputs))
  assert set(meta_inputs) <= train_inputs
  test_inputs = [text(i) for i in test_ids]
  shots = []
  for s in SEEDS:
    shot = [r['input'] for r in rows[f'{task}_{K}_{s}_train.jsonl']]
    test = [r['input'] for r in rows[f'{task}_{K}_{s}_test.jsonl']]
    assert len(shot) == K == len(set(shot)) and set(shot) <= train_inputs
    assert not set(test) & set(shot), f'seed {s}: a test input is among its train inputs'
    assert test == [x for x in test_inputs if x not in shot], 'the split\'s order, minus overlap'
    shots.append(tuple(shot))
  assert len(set(shots)) == len(SEEDS), 'each seed draws its own k examples'
  return rows


def counts(rows):
  return {name: len(rs) for name, rs in rows.items()}


# ----------------------------------------------------------------------------- the sources


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A DatasetDict with a ClassLabel (names red, blue), saved with save_to_disk."""
  import datasets
  feats = datasets.Features({'sentence': datasets.Value('string'),
                             'topic': datasets.Value('string'),
                             'label': datasets.ClassLabel(names=['red', 'blue'])})

  def split(ids):
    return datasets.Dataset.from_dict(
        {'sentence': [text(i) for i in ids], 'topic': ['x'] * len(ids),
         'label': [LABEL_OF[text(i)] for i in ids]}, features=feats)
  d = tmp_path_factory.mktemp('hf') / 'saved'
  datasets.DatasetDict({'train': split(TRAIN_IDS), 'test': split(HF_TEST_IDS)}).save_to_disk(str(d))
  return str(d)


@pytest.fixture(scope='module')
def file_dir(tmp_path_factory):
  """The HF source's data as jsonl and as csv: integer labels, no label names."""
  d = tmp_path_factory.mktemp('files')
  for name, ids in (('train', TRAIN_IDS), ('test', HF_TEST_IDS)):
    rows = [{'sentence': text(i), 'label': LABEL_OF[text(i)]} for i in ids]
    (d / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (d / f'{name}.csv').write_text('sentence,label\n' + ''.join(
        f'{r["sentence"]},{r["label"]}\n' for r in rows))
  (d / 'empty.csv').write_text('sentence,label\n')
  return d


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A TFDS dataset metal_tiny_cls/plain:1.0.0 (text, ClassLabel green/yellow) as array_record,
  written by a GeneratorBasedBuilder without TensorFlow."""
  import tensorflow_datasets as tfds

  class MetalTinyCls(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='plain')]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict({
          'text': tfds.features.Text(),
          'label': tfds.features.ClassLabel(names=['green', 'yellow'])}))  # stored as generated

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(TRAIN_IDS),
              'test': self._generate_examples(TFDS_TEST_IDS)}

    def _generate_examples(self, ids):
      for i in ids:
        yield i, {'text': text(i), 'label': LABEL_OF[text(i)]}

  d = tmp_path_factory.mktemp('tfds')
  MetalTinyCls(data_dir=str(d), config='plain').download_and_prepare(file_format='array_record')
  assert list(d.glob('metal_tiny_cls/plain/1.0.0/*.array_record-*')), 'array_record files'
  return str(d)


# ----------------------------------------------------------------------------- conversions


def test_hf_saved_dataset_to_metaicl_files(hf_dir, tmp_path):
  out = str(tmp_path / 'a')
  summary = sources.convert(source='hf', path=hf_dir, input='sentence', task='hf_cls', out=out)
  rows = check_task(out, 'hf_cls', ['red', 'blue'], HF_TEST_IDS)
  n_test = N_NEW + N_TRAIN - K  # every one of a seed's 16 train inputs is in the test split
  assert counts(rows) == {'hf_cls_16384_100_train.jsonl': N_TRAIN,
                          **{f'hf_cls_16_{s}_train.jsonl': K for s in SEEDS},
                          **{f'hf_cls_16_{s}_test.jsonl': n_test for s in SEEDS}}
  assert summary['files'] == counts(rows) and summary['options'] == ['red', 'blue']
  assert summary['overlap_removed'] == {s: K for s in SEEDS}

  # Deterministic: a second conversion writes byte-identical files (elsewhere, and in place).
  out2 = str(tmp_path / 'b')
  sources.convert(source='hf', path=hf_dir, input='sentence', task='hf_cls', out=out2)
  sources.convert(source='hf', path=hf_dir, input='sentence', task='hf_cls', out=out)
  for name in rows:
    a = Path(out, 'hf_cls', name).read_bytes()
    assert a == Path(out2, 'hf_cls', name).read_bytes(), name
    assert read(Path(out, 'hf_cls', name)) == rows[name], name

  # The meta-train cap; a template over two columns; a map over ClassLabel names.
  sources.convert(source='hf', path=hf_dir, task='capped', out=out, max_meta_train=12,
                  template='{sentence} about {topic}', label_map='red:no,blue:yes')
  meta = read(Path(out, 'capped', 'capped_16384_100_train.jsonl'))
  assert len(meta) == 12 and len({r['input'] for r in meta}) == 12
  for r in meta:
    assert r['input'].endswith(' about x') and r['options'] == ['no', 'yes']
    assert r['output'] == ['no', 'yes'][LABEL_OF[r['input'][:-len(' about x')]]]


def test_data_files_jsonl_and_csv_with_a_label_map(file_dir, tmp_path):
  """jsonl and csv of the same data give the same files; the map's order is the options'."""
  out = {}
  for ext in ('jsonl', 'csv'):
    out[ext] = str(tmp_path / ext)
    sources.convert(source='hf', path=f'train={file_dir}/train.{ext},test={file_dir}/test.{ext}',
                    input='sentence', label_map='0:green,1:yellow', task='files_cls',
                    out=out[ext])
  rows = check_task(out['jsonl'], 'files_cls', ['green', 'yellow'], HF_TEST_IDS)
  assert len(rows['files_cls_16_42_test.jsonl']) == N_NEW + N_TRAIN - K
  for name in rows:
    assert (Path(out['jsonl'], 'files_cls', name).read_bytes()
            == Path(out['csv'], 'files_cls', name).read_bytes()), name


def test_tfds_dataset_to_metaicl_files(tfds_dir, tmp_path):
  out = str(tmp_path / 'out')
  summary = sources.convert(source='tfds', path='metal_tiny_cls/plain:1.0.0',
                            tfds_data_dir=tfds_dir, input='text', task='tfds_cls', out=out)
  rows = check_task(out, 'tfds_cls', ['green', 'yellow'], TFDS_TEST_IDS)
  assert counts(rows) == {'tfds_cls_16384_100_train.jsonl': N_TRAIN,
                          **{f'tfds_cls_16_{s}_train.jsonl': K for s in SEEDS},
                          **{f'tfds_cls_16_{s}_test.jsonl': N_NEW for s in SEEDS}}
  assert summary['overlap_removed'] == {s: 0 for s in SEEDS}

  # --max_test: one seeded sample for every seed, in the split's order.
  sources.convert(source='tfds', path='metal_tiny_cls', tfds_data_dir=tfds_dir, input='text',
                  task='tfds_few', out=out, max_test=4)
  tests = [[r['input'] for r in read(Path(out, 'tfds_few', f'tfds_few_16_{s}_test.jsonl'))]
           for s in SEEDS]
  assert len(tests[0]) == 4 and all(t == tests[0] for t in tests)
  order = [text(i) for i in TFDS_TEST_IDS]
  assert sorted(tests[0], key=order.index) == tests[0]


def test_mistakes_name_the_flag_and_column(hf_dir, file_dir, tfds_dir, tmp_path):
  out = str(tmp_path / 'out')
  base = dict(source='hf', path=hf_dir, task='t', out=out)
  cases = [
      (dict(input='nosuch'), ["--input: no column 'nosuch'", "'sentence'"]),
      (dict(input='sentence', label='nolabel'), ["--label: no column 'nolabel'"]),
      (dict(input='sentence', label_map='red:no,purple:yes'),
       ['--label_map', '1 (blue)', "'label'"]),
      (dict(input='sentence', label_map='red:no'), ['--label_map: 1 label word']),
      (dict(path=f'train={file_dir}/train.csv,test={file_dir}/empty.csv', input='sentence',
            label_map='0:a,1:b'), ["--split_test='test': the split is empty", 'empty.csv']),
      (dict(input='sentence', split_test='validation'), ["--split_test='validation'", "'train'"]),
      (dict(input='sentence', template='{nosuch}'), ['--template', 'nosuch']),
      (dict(input='sentence', k=41), ['--split_train', 'fewer than --k=41']),
      (dict(input='sentence', seeds='1,x'), ['--seeds']),
      (dict(input='sentence', task='a/b'), ['--task']),
      (dict(path=f'{file_dir}/train.jsonl', input='sentence', split_test=''),
       ['--label', 'not a ClassLabel', '--label_map']),
      (dict(source='tfds', path='nosuch_ds', tfds_data_dir=tfds_dir, input='text'),
       ["--path='nosuch_ds'", 'TFDS']),
  ]
  for kw, wants in cases:
    with pytest.raises(DataError) as e:
      sources.convert(**{**base, **kw})
    for want in wants:
      assert want in str(e.value), (kw, str(e.value))
  assert not os.path.exists(out), 'a refused conversion writes nothing'


def test_prepare_data_cli(hf_dir, tmp_path):
  """prepare_data.py converts; a mistake is one line on stderr, exit status 2."""
  out = tmp_path / 'out'
  cmd = [sys.executable, str(ROOT / 'prepare_data.py'), '--source=hf', f'--path={hf_dir}',
         '--task=cli', f'--out={out}', '--seeds=100,13']
  ok = subprocess.run(cmd + ['--input=sentence'], capture_output=True, text=True, cwd=ROOT)
  assert ok.returncode == 0, ok.stderr
  assert 'cli_16_13_test.jsonl: 34 examples' in ok.stdout
  assert sorted(os.listdir(out / 'cli')) == sorted(
      ['cli_16384_100_train.jsonl'] + [f'cli_16_{s}_{sp}.jsonl' for s in (100, 13)
                                       for sp in ('train', 'test')])
  bad = subprocess.run(cmd + ['--input=nosuch'], capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode == 2
  lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("prepare_data.py: --input: no column 'nosuch'")


# ----------------------------------------------------------------------------- data directories


def write_setting(path, train, test, dirs=None):
  s = {'train': train, 'test': test, **({'dirs': dirs} if dirs is not None else {})}
  Path(path).write_text(json.dumps(s))
  return str(path)


def test_several_data_directories(hf_dir, tfds_dir, tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  sources.convert(source='hf', path=hf_dir, input='sentence', task='hf_cls', out=a)
  sources.convert(source='tfds', path='metal_tiny_cls', tfds_data_dir=tfds_dir, input='text',
                  task='tfds_cls', out=b)
  sources.convert(source='tfds', path='metal_tiny_cls', tfds_data_dir=tfds_dir, input='text',
                  task='only_b', out=b, split_test='')
  c = tiny_run_config('unused')
  c.data_dir = f'{a},{b}'
  c.setting = write_setting(tmp_path / 's.json', ['hf_cls', 'only_b'], ['tfds_cls'])
  loc, setting = experiment.data_location(c, str(tmp_path / 'run'))
  assert setting == {'train': ['hf_cls', 'only_b'], 'test': ['tfds_cls']}
  assert (loc.dir('hf_cls'), loc.dir('tfds_cls'), loc.dir('only_b')) == (a, b, b)
  assert loc.meta_train_file('only_b') == os.path.join(b, 'only_b', 'only_b_16384_100_train.jsonl')
  with pytest.raises(TypeError):
    os.fspath(loc)  # several directories are not one path

  # The meta-train and evaluation loaders go through the locator.
  tok = synthetic.build_tokenizer()
  tasks = experiment.meta_train_tasks(c, loc, setting, tok, str(tmp_path / 'run'))
  assert [len(t) for t in tasks] == [N_TRAIN, N_TRAIN]
  assert [os.path.dirname(os.path.dirname(t.path)) for t in tasks] == [a, b]
  seeds = evaluation.load_task_seeds(loc, setting['test'], [100, 42], tok,
                                     str(tmp_path / 'cache'), 256)
  assert [(ts.task, ts.seed, len(ts.train), len(ts.test)) for ts in seeds] == [
      ('tfds_cls', 100, K, N_NEW), ('tfds_cls', 42, K, N_NEW)]
  assert seeds[0].train.path.startswith(b)

  # A task in two directories is an error naming it and both (in search order), at start-up.
  sources.convert(source='tfds', path='metal_tiny_cls', tfds_data_dir=tfds_dir, input='text',
                  task='hf_cls', out=b, split_test='')
  with pytest.raises(DataError) as e:
    experiment.data_location(c, str(tmp_path / 'run'))
  msg = str(e.value)
  assert "'hf_cls'" in msg and f'{a} and {b}' in msg
  # ... unless the setting's "dirs" names the one to use (relative to the setting file).
  c.setting = write_setting(tmp_path / 's2.json', ['hf_cls', 'only_b'], ['tfds_cls'],
                            dirs={'hf_cls': 'b'})
  loc, setting = experiment.data_location(c, str(tmp_path / 'run'))
  assert loc.dir('hf_cls') == os.path.join(str(tmp_path), 'b') and loc.dir('only_b') == b
  # A task in none of them names the directories searched; so does a missing directory.
  c.setting = write_setting(tmp_path / 's3.json', ['nowhere'], ['tfds_cls'])
  with pytest.raises(DataError, match=f"'nowhere'.*{a}, {b}"):
    experiment.data_location(c, str(tmp_path / 'run'))
  c.data_dir = f'{a},{tmp_path}/nosuch'
  with pytest.raises(DataError, match="--config.data_dir=.*'.*nosuch': no such directory"):
    experiment.data_location(c, str(tmp_path / 'run'))

  # data_dir '' with a setting that places every task: the map alone (no synthetic suite).
  c.data_dir = ''
  c.setting = write_setting(tmp_path / 's4.json', ['hf_cls'], ['tfds_cls'],
                            dirs={'hf_cls': a, 'tfds_cls': 'b'})
  loc, setting = experiment.data_location(c, str(tmp_path / 'run'))
  assert (loc.dir('hf_cls'), loc.dir('tfds_cls')) == (a, b)
  assert not os.path.exists(tmp_path / 'run' / 'data')
  c.setting = write_setting(tmp_path / 's5.json', ['hf_cls'], ['tfds_cls'], dirs={'typo': a})
  with pytest.raises(DataError, match=r'"dirs" names tasks .*typo'):
    experiment.data_location(c, str(tmp_path / 'run'))


def test_one_directory_locator_is_the_directory(tmp_path):
  """A single directory resolves exactly as tasks.task_file does, without looking."""
  loc = TaskLocator(str(tmp_path))
  assert os.fspath(loc) == str(tmp_path) and TaskLocator.of(str(tmp_path)) == loc
  assert loc.task_file('x', 16, 13, 'test') == os.path.join(str(tmp_path), 'x',
                                                            'x_16_13_test.jsonl')
  assert TaskLocator.of(loc) is loc


def test_train_two_steps_on_converted_data(hf_dir, tfds_dir, tmp_path):
  """Converted tasks are a data directory train.py meta-trains on (HF task) and eval.py's
  loader reads (TFDS task)."""
  data = str(tmp_path / 'data')
  sources.convert(source='hf', path=hf_dir, input='sentence', task='hf_cls', out=data)
  sources.convert(source='tfds', path='metal_tiny_cls/plain:1.0.0', tfds_data_dir=tfds_dir,
                  input='text', task='tfds_cls', out=data)
  c = tiny_run_config(tiny_run_model(tmp_path / 'model'))
  c.data_dir = data
  c.setting = write_setting(tmp_path / 'setting.json', ['hf_cls'], ['tfds_cls'])
  workdir = str(tmp_path / 'run')
  summary = run_train.train(c, workdir)
  assert summary['steps'] == 2 and summary['last'] is not None
  tok = synthetic.build_tokenizer()
  meta = load_tokenized(os.path.join(data, 'hf_cls', 'hf_cls_16384_100_train.jsonl'), tok,
                        str(tmp_path / 'cache'))
  assert len(meta) == N_TRAIN and all(len(x) == 2 for x in meta.input_first)  # two known words
  loc, setting = experiment.data_location(c, workdir)
  ts = evaluation.load_task_seeds(loc, setting['test'], SEEDS, tok, str(tmp_path / 'cache'), 256)
  assert [len(t.train) for t in ts] == [K] * len(SEEDS)
