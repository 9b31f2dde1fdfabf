"""Workdir paths that may be local or in an object store (``gs://``, ``s3://``).

Every file a run writes outside its checkpoints (config.json, metrics.jsonl,
results, report.png, the lock) goes through ``etils.epath``, the path library
Orbax uses for the checkpoints, so ``--workdir=gs://bucket/run`` writes nothing
on the local disk. Local paths keep what only a filesystem gives: a kernel
lock, and write-to-temporary-then-rename. An object store has neither, and
needs neither for atomicity: an object becomes visible only once its upload
is complete.
"""

from __future__ import annotations

import os
import re

from etils import epath

REMOTE_SCHEMES = ("gs", "s3")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsupportedPathError(ValueError):
  """A workdir URL whose scheme no backend here reads."""


def scheme(path: str) -> str | None:
  """``"gs"`` for ``gs://b/x``; None for a local path."""
  found = _SCHEME.match(os.fspath(path))
  return found[1].lower() if found else None


def is_local(path: str) -> bool:
  return scheme(path) is None


def check_supported(path: str, what: str = "--workdir") -> None:
  """Raise ``UnsupportedPathError`` for a URL that is neither local nor gs:// / s3://."""
  found = scheme(path)
  if found is not None and found not in REMOTE_SCHEMES:
    raise UnsupportedPathError(
        f"{what}={path}: the scheme {found}:// is not supported; use a local path, "
        + " or ".join(f"{s}://bucket/path" for s in REMOTE_SCHEMES)
    )


def absolute(path: str) -> str:
  """Local paths made absolute; URLs unchanged."""
  return os.path.abspath(path) if is_local(path) else os.fspath(path)


def join(path: str, *names: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*names))


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_atomic(path: str, data: bytes | str) -> None:
  """Write ``data`` so that ``path`` never holds a partial file.

  Local: a temporary file in the same folder, flushed, then renamed over
  ``path``. Object store: one upload (objects appear whole or not at all).
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if not is_local(path):
    target = epath.Path(path)
    makedirs(os.fspath(target.parent))
    target.write_bytes(raw)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
