"""Where the persistent compilation cache goes: flag, then environment, then a per-CPU default."""

import os
import subprocess
import sys

from masc_jax.parallel import compile_cache


def test_the_flag_wins_then_masc_env_then_jax_env_then_the_default(tmp_path):
  env = {
      "XDG_CACHE_HOME": str(tmp_path),
      "MASC_COMPILATION_CACHE_DIR": "/m",
      "JAX_COMPILATION_CACHE_DIR": "/j",
  }
  assert compile_cache.resolve("/flag", env) == "/flag"
  assert compile_cache.resolve(None, env) == "/m"
  del env["MASC_COMPILATION_CACHE_DIR"]
  assert (
      compile_cache.resolve(None, env) is None
  )  # JAX's own setting stays in force
  del env["JAX_COMPILATION_CACHE_DIR"]
  default = compile_cache.resolve(None, env)
  assert os.path.dirname(default) == os.path.join(str(tmp_path), "masc_jax")
  assert os.path.basename(default).startswith("xla-")
  assert compile_cache.resolve(None, {"HOME": str(tmp_path)}).startswith(
      str(tmp_path)
  )


def test_none_turns_it_off_from_the_flag_or_the_environment():
  for value in ("none", "off", "", " None "):
    assert compile_cache.resolve(value, {}) is None
    assert (
        compile_cache.resolve(None, {"MASC_COMPILATION_CACHE_DIR": value})
        is None
    )


def test_the_default_folder_is_named_after_this_cpu():
  """Machines of other instruction sets (AVX2 vs AVX-512) never share executables."""
  with open("/proc/cpuinfo") as f:
    flags = (
        next(l for l in f if l.startswith(("flags", "Features")))
        .split(":", 1)[1]
        .split()
    )
  import hashlib
  import platform

  expected = f"xla-{platform.machine()}-{hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:8]}"
  assert (
      os.path.basename(compile_cache.default_directory({"HOME": "/h"}))
      == expected
  )


def _compile_once(cache_dir, environ):
  """A fresh process: ``enable(cache_dir)``, then one program compiled."""
  code = (
      "import jax\n"
      "from masc_jax.parallel import compile_cache\n"
      f"compile_cache.enable({cache_dir!r})\n"
      "jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=environ,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return sorted(os.listdir(cache_dir))


def test_a_shared_cache_is_locked_unless_jax_is_told_otherwise(tmp_path):
  """JAX locks the folder (its ``.lockfile``) only under a size limit: ``enable``
  sets one, and leaves ``$JAX_COMPILATION_CACHE_MAX_SIZE`` in force."""
  environ = {
      k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPIL")
  }
  locked = _compile_once(str(tmp_path / "ours"), environ)
  assert ".lockfile" in locked
  assert any(name.endswith("-cache") for name in locked), locked
  unlimited = _compile_once(
      str(tmp_path / "theirs"),
      {**environ, "JAX_COMPILATION_CACHE_MAX_SIZE": "-1"},
  )
  assert ".lockfile" not in unlimited
  assert any(name.endswith("-cache") for name in unlimited), unlimited
