"""configs/: every shipped config loads, the paper configs carry the paper's recipe, and setting
names resolve to the shipped MetaICL settings (the library itself reads paths only)."""

import subprocess
import sys
from pathlib import Path

import pytest

import configs
from configs import default, paper
from metal_jax.data.tasks import load_setting

ROOT = Path(__file__).resolve().parents[1]
SETTING_COUNTS = {'cls2cls': (43, 20), 'hr2lr': (61, 26), 'qa2qa': (37, 22)}
PAPER_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*_*.py')
                     if not p.stem.startswith('_'))


@pytest.mark.parametrize('name', sorted(SETTING_COUNTS))
def test_shipped_settings(name):
  s = load_setting(configs.setting_path(name))
  n_train, n_test = SETTING_COUNTS[name]
  assert (len(s['train']), len(s['test'])) == (n_train, n_test)
  assert len(set(s['train'])) == n_train and len(set(s['test'])) == n_test
  assert not set(s['train']) & set(s['test'])


def test_unknown_setting_lists_known():
  with pytest.raises(configs.UnknownSetting) as e:
    configs.setting_path('cls2lr_nonexistent')
  msg = str(e.value)
  assert 'cls2lr_nonexistent' in msg
  for name in SETTING_COUNTS:
    assert name in msg


def test_setting_path_keeps_paths_and_empty(tmp_path):
  p = tmp_path / 'mine.json'
  p.write_text('{"train": ["a"], "test": ["b"]}')
  assert configs.setting_path(str(p)) == str(p)
  assert configs.setting_path('') == ''
  assert configs.known_settings() == sorted(SETTING_COUNTS)


@pytest.mark.parametrize('stem', PAPER_FILES)
@pytest.mark.parametrize('split', [None, '12,4'])
def test_paper_configs_load(stem, split):
  """Each configs/MODEL_SETTING.py is the paper's recipe for its setting, its setting a file."""
  mod = __import__(f'configs.{stem}', fromlist=['get_config'])
  c = mod.get_config(split)
  setting = next(s for s in paper.SETTINGS if stem.endswith(s))
  assert Path(c.setting) == configs.SETTINGS_DIR / f'{setting}.json'
  load_setting(c.setting)
  recipe = paper.SETTINGS[setting]
  assert (c.optim.lr, c.epochs) == (recipe['lr'], recipe['epochs'])
  assert (c.n_prompt_examples, c.n_lm_examples) == ((12, 4) if split else (16, 0))
  assert c.model == paper.MODELS[stem[:-len(setting) - 1]]
  # Everything else is the default's fields: a paper config adds no field of its own.
  assert sorted(c.keys()) == sorted(default.get_config().keys())


def test_train_py_names_an_unknown_setting_without_traceback(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--config.setting=nosuch',
                         f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=120,
                        cwd=str(ROOT))
  assert proc.returncode != 0
  assert '--config.setting=nosuch' in proc.stderr and 'cls2cls' in proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert not any(tmp_path.iterdir())  # nothing prepared
