"""Experiment configs: one get_config() per file, loaded with --config=configs/NAME.py.

The package also owns what the configs share: the paper's meta-training recipe
(`configs.paper`) and MetaICL's task settings (`configs/settings/NAME.json`), which
`setting_path` turns from a name into the path the library reads. The library itself
takes paths only; it never looks inside this directory.
"""

from __future__ import annotations

from pathlib import Path

from metal_jax.errors import UserError

SETTINGS_DIR = Path(__file__).resolve().parent / 'settings'


class UnknownSetting(UserError):
  """A setting name that is neither a shipped setting nor an existing file."""


def known_settings() -> list[str]:
  return sorted(p.stem for p in SETTINGS_DIR.glob('*.json'))


def setting_path(name_or_path: str) -> str:
  """A shipped setting's name (cls2cls, hr2lr, qa2qa) -> its JSON file; a path stays as given.

  '' (the synthetic suite needs no setting) stays ''.
  """
  if not name_or_path or Path(name_or_path).exists():
    return name_or_path
  if not Path(name_or_path).suffix and name_or_path in known_settings():
    return str(SETTINGS_DIR / f'{name_or_path}.json')
  raise UnknownSetting(f'--config.setting={name_or_path}: neither a shipped setting '
                       f'{known_settings()} nor an existing file')
