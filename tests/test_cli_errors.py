"""A user's mistake is one line, not a traceback (issue 17, item 7 and item 2).

train.py / eval.py print a UserError's message alone (exit status 2): malformed task files name
the file and line, config fields and flags name the flag (an unknown field with its nearest
valid names), zero-token examples and vocabularies that cannot work are refused before any
training, a relative model path that does not exist is named before any hub look-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import save_hf, tiny_run_config, tiny_run_model
from metal_jax import errors, experiment, run_train, sharding
from metal_jax.data import synthetic
from metal_jax.data.tasks import meta_train_file
from metal_jax.models.hf import CheckpointError, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {'task': 't', 'input': 'the cat', 'output': 'red', 'options': ['red', 'blue']}


def run_script(*args):
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  env.pop('METAL_JAX_DEBUG', None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith(('I1', 'W1', 'E1'))]
  assert len(lines) == 1 and 'Traceback' not in stderr, stderr
  return lines[0]


@pytest.mark.parametrize('override,want', [
    ('--config.nonexistent=1', 'train.py: --config.nonexistent: no such config field'),
    ('--config.optim.lrr=1', 'train.py: --config.optim.lrr: no such config field; nearest: '
                             'optim.lr'),
])
def test_unknown_config_field_is_one_line_with_the_nearest(override, want, tmp_path):
  out = run_script('train.py', f'--workdir={tmp_path}', override)
  assert out.returncode == 2
  assert one_line(out.stderr) == want


def test_eval_flag_mistake_is_one_line(tmp_path):
  out = run_script('eval.py', f'--workdir={tmp_path}', '--seeds=100,x')
  assert out.returncode == 2
  assert one_line(out.stderr) == 'eval.py: --seeds=100,x: expected comma-separated integers'
  out = run_script('eval.py', f'--workdir={tmp_path}', '--methods=nosuch')
  assert out.returncode == 2 and "--methods: unknown ['nosuch']" in one_line(out.stderr)


# ----------------------------------------------------------------------------- task files


def write_lines(path, lines: list) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    for x in lines:
      f.write(x if isinstance(x, bytes) else (json.dumps(x) if isinstance(x, dict) else x)
              .encode() + b'\n')


MALFORMED = {  # the meta-train file's lines -> what the error says, after 'FILE:LINE: '
    'bad_json': ([GOOD, '{"task": "t", "input": '], ':2: invalid JSON'),
    'missing_key': ([GOOD, GOOD, {k: v for k, v in GOOD.items() if k != 'options'}],
                    ":3: missing key 'options'"),
    'not_an_option': ([{**GOOD, 'output': 'green'}], ":1: output 'green' is not among its"),
    'options_not_a_list': ([{**GOOD, 'options': 'red'}], ':1: "options" must be a list'),
    'not_utf8': ([GOOD, b'{"task": "t", "input": "caf\xe9"}'], ':2: not UTF-8 (byte 27 of the line'),
    'zero_token_input': ([GOOD, {**GOOD, 'input': ''}], ':2: the input tokenises to zero tokens'),
    'empty_file': ([], ': no examples (empty task file)'),
    'a_json_list': ([GOOD, '[1, 2]'], ':2: expected a JSON object, got list'),
}


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return tiny_run_model(tmp_path_factory.mktemp('model'))


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_task_file_is_one_line_naming_file_and_line(case, model_dir, tmp_path, capsys):
  lines, want = MALFORMED[case]
  data = tmp_path / 'data'
  setting = tmp_path / 'setting.json'
  setting.write_text(json.dumps({'train': ['t'], 'test': ['u']}))
  write_lines(meta_train_file(str(data), 't'), lines)
  c = tiny_run_config(model_dir)
  c.data_dir, c.setting = str(data), str(setting)
  with pytest.raises(SystemExit) as e:
    errors.run_cli('train.py', run_train.train, c, str(tmp_path / 'run'))
  assert e.value.code == 2
  line = one_line(capsys.readouterr().err)
  assert line.startswith(f'train.py: {meta_train_file(str(data), "t")}'), line
  assert want in line, line


def test_missing_task_directory_names_it(model_dir, tmp_path, capsys):
  setting = tmp_path / 'setting.json'
  setting.write_text(json.dumps({'train': ['nowhere'], 'test': ['u']}))
  c = tiny_run_config(model_dir)
  c.data_dir, c.setting = str(tmp_path), str(setting)
  with pytest.raises(SystemExit):
    errors.run_cli('train.py', run_train.train, c, str(tmp_path / 'run'))
  line = one_line(capsys.readouterr().err)
  assert 'nowhere' in line and 'task file not found' in line


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize('field,value,want', [
    ('num_steps', -5, "--config.num_steps=-5: must be >= 0"),
    ('n_prompt_examples', 20, '--config.n_prompt_examples=20: n_prompt_examples + n_lm_examples '
                              '= 20: eval.py splits the 16 examples'),
    ('batch_size', 0, '--config.batch_size=0: must be positive'),
])
def test_config_values_that_cannot_work_are_named_at_start(field, value, want, model_dir):
  c = tiny_run_config(model_dir)
  c[field] = value
  with pytest.raises(errors.FlagError) as e:
    experiment.validate(c)
  assert str(e.value).startswith(want), str(e.value)


def test_vocabulary_that_cannot_work_is_refused_naming_both_sizes(tmp_path):
  tok = synthetic.build_tokenizer()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  small = tmp_path / 'small'
  save_hf('gpt2', small, vocab_size=10, n_positions=64)
  c = tiny_run_config(small)
  with pytest.raises(CheckpointError, match=f'vocab_size 10 is smaller than the tokenizer.s '
                                            f'{len(tok)} ids'):
    experiment.load_model(c, str(small), mesh, tok)
  empty = tmp_path / 'empty'
  save_hf('gpt2', empty, vocab_size=10, n_positions=64)
  cfg = json.loads((empty / 'config.json').read_text())
  (empty / 'config.json').write_text(json.dumps({**cfg, 'vocab_size': 0}))
  with pytest.raises(CheckpointError, match='config.json: vocab_size 0; a model needs'):
    experiment.load_model(c, str(empty), mesh)


def test_a_relative_model_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('models')
  with pytest.raises(CheckpointError, match='^models/gpt2-large: no such directory$'):
    resolve('models/gpt2-large')
  with pytest.raises(CheckpointError, match='^a/b/c: no such directory$'):
    resolve('a/b/c')
  # A hub id on a machine without the hub (HF_HUB_OFFLINE=1 in conftest): one line, its reason.
  with pytest.raises(CheckpointError, match='^nosuch-org/nosuch-model: not a local directory, '
                                            'and fetching it as a hub id failed'):
    resolve('nosuch-org/nosuch-model')
