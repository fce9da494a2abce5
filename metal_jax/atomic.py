"""Whole-file writes that a reader or a crash never sees half done: the one way metal-jax writes
a file another process or a later run reads (results, task files, prompts, caches, checksums).

The data goes to a temporary file of a unique name in the target's directory (so concurrent
writers never share one, and the rename stays on one filesystem), is flushed (and fsynced when
`durable`), then renamed over the target with os.replace; on any failure the temporary file is
removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import numpy as np


def write(path: str, data: str | bytes, *, durable: bool = False, tmp_prefix: str = '') -> None:
  """Replaces `path` by `data` (text is UTF-8) atomically; durable: fsync before the rename (a
  power loss then keeps the old file or the new). tmp_prefix names the temporary file (default:
  the target's name + '.tmp-'), for a reader that recognises leftovers of a crash."""
  directory = os.path.dirname(path) or '.'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=tmp_prefix or os.path.basename(path) + '.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj, **dump_kw) -> None:
  """json.dumps(obj, **dump_kw) written atomically (the directory is created if missing)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  write(path, json.dumps(obj, **dump_kw))


def write_npz(path: str, **arrays) -> None:
  """np.savez of `arrays` written atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write(path, buf.getvalue())
