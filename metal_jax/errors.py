"""User mistakes, told apart from bugs: the command lines print a UserError's message alone.

A UserError (bad data, a config field or flag, a checkpoint) carries a message that names what is
at fault (file and line, key, flag) and what was expected. train.py, eval.py and serve.py print
it as one line and exit with status 2; anything else is a bug and keeps its traceback.
`--debug` (or METAL_JAX_DEBUG=1) shows the traceback of a user's mistake too.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, TypeVar

T = TypeVar('T')
EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A mistake in the user's input; the message names it."""


class FlagError(UserError):
  """A command-line flag or config field with a value that cannot work."""


def debug() -> bool:
  return os.environ.get('METAL_JAX_DEBUG', '') not in ('', '0') or '--debug' in sys.argv


def run_cli(prog: str, fn: Callable[..., T], *args, extra: tuple = (), **kw) -> T:
  """fn(*args, **kw); a UserError (or one of `extra`) exits with its message as one line."""
  try:
    return fn(*args, **kw)
  except (UserError, *extra) as e:
    if debug():
      raise
    sys.stdout.flush()
    print(f'{prog}: {e}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def config_override_error(e: BaseException, argv: list[str], config=None) -> str:
  """A one-line message for a failed --config.FIELD=VALUE override (ml_collections raises a
  KeyError/AttributeError/TypeError/ValueError at flag definition), naming the flag and, for an
  unknown field, the nearest valid ones."""
  text = str(e.args[0] if e.args else e).strip('\'"')
  key = re.match(r"^\\?'?([A-Za-z0-9_]+)", text)
  flags = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
  bad = [f for f in flags if key and f.split('.')[-1] == key.group(1)]
  flag = bad[0] if bad else (flags[0] if flags else '--config')
  if isinstance(e, (KeyError, AttributeError)):
    near = ''
    if config is not None:
      path = flag[len('--config.'):].split('.')
      node = config
      for part in path[:-1]:
        node = node.get(part, None) if hasattr(node, 'get') else None
      if node is not None and hasattr(node, 'keys'):
        match = difflib.get_close_matches(path[-1], list(node.keys()), n=3)
        near = f'; nearest: {", ".join(".".join(path[:-1] + [m]) for m in match)}' if match else ''
    return f'{flag}: no such config field{near}'
  return f'{flag}: {" ".join(text.split())}'


def define_config_flag(prog: str, default_file: str, help_text: str = 'experiment config') -> None:
  """config_flags.DEFINE_config_file, whose --config.FIELD=VALUE overrides are applied as it is
  defined: a wrong field or value exits with one line naming the flag (nearest fields too)."""
  from ml_collections import config_flags
  try:
    config_flags.DEFINE_config_file('config', default_file, help_text)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    if debug():
      raise
    config = None
    path = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), default_file)
    try:
      import importlib.util
      spec = importlib.util.spec_from_file_location('_metal_jax_config', path.split(':')[0])
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config()
    except Exception:  # the nearest names are a courtesy; the message stands without them
      pass
    print(f'{prog}: {config_override_error(e, sys.argv, config)}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
