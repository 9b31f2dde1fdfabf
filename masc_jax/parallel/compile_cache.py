"""JAX's persistent compilation cache: a run compiles each program once per machine.

Compiling the stages' steps and the evaluations is a large share of a short
run (about 14 of the digits run's ~57 s). With the cache on, a second run of
the same config loads every executable from disk instead.

Where it lives, first that applies:
  1. ``--compilation_cache_dir=DIR`` (``none`` turns the cache off);
  2. ``$MASC_COMPILATION_CACHE_DIR`` (the same, for code that never sees the flags);
  3. ``$JAX_COMPILATION_CACHE_DIR``, JAX's own setting, left as it is;
  4. ``$XDG_CACHE_HOME/masc_jax/xla-<cpu>`` (``~/.cache`` when XDG_CACHE_HOME is unset).

The default folder is named after the CPU's architecture and instruction-set
flags, so a home directory shared by AVX2 and AVX-512 machines never hands one
of them an executable compiled for the other.

Runs may share a cache, and the processes of one run do. JAX writes an entry
in place, so a process could read another's half-written entry (JAX then warns
and compiles the program again); with a size limit, JAX takes a file lock
around every read and write instead. ``enable`` sets one: ``MAX_BYTES``, the
least recently used entries evicted beyond it, unless
``$JAX_COMPILATION_CACHE_MAX_SIZE`` sets JAX's own.
"""

from __future__ import annotations

import hashlib
import os
import platform

OFF = ("none", "off", "")
# Far more than a run's programs take (the tiny config's: 1.3 MB on disk).
MAX_BYTES = 8 * 2**30


def cpu_tag() -> str:
  """``x86_64-1a2b3c4d``: the architecture and a hash of the CPU's feature flags."""
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          flags = " ".join(sorted(line.split(":", 1)[1].split()))
          break
  except OSError:
    pass
  return f"{platform.machine() or 'cpu'}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def default_directory(environ: dict[str, str] | None = None) -> str:
  environ = os.environ if environ is None else environ
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "masc_jax", f"xla-{cpu_tag()}")


def _requested(flag_value: str | None, environ: dict[str, str]) -> str | None:
  """What masc_jax was asked for: the flag, else ``$MASC_COMPILATION_CACHE_DIR`` (None: neither)."""
  return (
      flag_value
      if flag_value is not None
      else environ.get("MASC_COMPILATION_CACHE_DIR")
  )


def _is_off(value: str | None) -> bool:
  return value is not None and value.strip().lower() in OFF


def resolve(
    flag_value: str | None, environ: dict[str, str] | None = None
) -> str | None:
  """The cache folder to use; None: off, or JAX's own ``JAX_COMPILATION_CACHE_DIR`` applies."""
  environ = os.environ if environ is None else environ
  requested = _requested(flag_value, environ)
  if requested is not None:
    return None if _is_off(requested) else os.path.expanduser(requested)
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  return default_directory(environ)


def enable(flag_value: str | None = None) -> str | None:
  """Point JAX's persistent cache at the resolved folder; returns the folder in use (None: off).

  Every program is cached, however quick its compile: the run's many small
  evaluation programs add up. Call before anything compiles.
  """
  import jax

  if _is_off(_requested(flag_value, os.environ)):
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  directory = resolve(flag_value)
  if directory is not None:
    jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    # A limit makes JAX lock the folder around reads and writes (module doc).
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
