"""Per-layer convolution timings of the expert network: forward, input- and filter-gradient.

    python -m benchmarks.conv_layers                      # JAX impls xla,im2col + PyTorch
    python -m benchmarks.conv_layers --impls xla --no-torch --layers 1,10
    python -m benchmarks.conv_layers --impls xla,im2col,tuned --no-torch [--max-isa AVX2]

For each of the 13 conv3x3 layers of the paper's expert network (batch 64,
CIFAR-size input) times, each in its own jit (median of ``--steps`` calls):
  fwd  ``conv.conv3x3(x, w, impl)``
  dx   the VJP w.r.t. the input (what autodiff computes for the layer below)
  dw   the VJP w.r.t. the kernel (the filter gradient)
and the same three for ``torch.nn.functional.conv2d`` (NCHW, autograd with
only the wanted input requiring grad). JAX and PyTorch run in the same process,
one after the other, so they see the same machine load; both are told to use
all cores.

``--impls`` may include ``tuned`` (``conv_impl="tuned"``): its column shows,
per pass, the time of the tuned conv and, in brackets, the method the tuner
chose (``masc_jax/nn/conv_tuning.py``). Unless ``$JAX_COMPILATION_CACHE_DIR`` is
set, the benchmark has no compilation cache, so the tuner measures every
candidate in this process and writes no plans file. The tuner's own
per-candidate medians go to ``--out``.

``--max-isa AVX2`` asks every library for an instruction-set cap, to try to
emulate an AVX2 machine on an AVX-512 one: ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``
(set before JAX is imported), ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, in jaxlib
and in PyTorch) and ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's ATen). XLA's
generated loops and oneDNN obey; YNNPACK, which runs XLA:CPU's convolutions
and matmuls by default, picks its kernels from CPUID and does not: see
benchmarks/README.md ("Emulating AVX2").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import common


def expert_layers(widths, pool_after, hw=(32, 32), in_channels=3):
  layers = []
  h, w = hw
  c = in_channels
  for i, width in enumerate(widths):
    layers.append((i, h, w, c, width))
    c = width
    if i in pool_after:
      h, w = h // 2, w // 2
  return layers


def _median_ms(fn, steps, warmup=2):
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(ts))


def tuned_plan(h, w, cin, cout, batch):
  """The tuner's decision per pass for one layer (measuring it now): ``{pass: record}``."""
  import jax.numpy as jnp
  from masc_jax.nn import conv_tuning

  return conv_tuning.plan_for((batch, h, w, cin), cout, jnp.float32)


def jax_times(h, w, cin, cout, batch, impl, steps):
  import jax
  import jax.numpy as jnp
  from masc_jax.nn import conv

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
  k = jnp.asarray(0.05 * rng.standard_normal((3, 3, cin, cout), np.float32))
  g = jnp.asarray(rng.standard_normal((batch, h, w, cout), np.float32))
  conv_fn = lambda x, k: conv.conv3x3(x, k, impl)
  fns = {
      "fwd": (jax.jit(conv_fn), (x, k)),
      "dx": (
          jax.jit(lambda x, k, g: jax.vjp(lambda x: conv_fn(x, k), x)[1](g)[0]),
          (x, k, g),
      ),
      "dw": (
          jax.jit(lambda x, k, g: jax.vjp(lambda k: conv_fn(x, k), k)[1](g)[0]),
          (x, k, g),
      ),
  }
  out = {}
  for name, (f, args) in fns.items():
    compiled = f.lower(*args).compile()
    out[name] = _median_ms(
        lambda: jax.block_until_ready(compiled(*args)), steps
    )
  return out


def torch_times(h, w, cin, cout, batch, steps, channels_last=False):
  import torch
  import torch.nn.functional as F

  gen = torch.Generator().manual_seed(0)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(batch, cin, h, w, generator=gen).contiguous(memory_format=fmt)
  k = (0.05 * torch.randn(cout, cin, 3, 3, generator=gen)).contiguous(
      memory_format=fmt
  )
  g = torch.randn(batch, cout, h, w, generator=gen).contiguous(
      memory_format=fmt
  )

  def fwd():
    with torch.no_grad():
      F.conv2d(x, k, padding=1)

  def grad(wrt):
    xx = x.detach().requires_grad_(wrt == "x")
    kk = k.detach().requires_grad_(wrt == "w")
    y = F.conv2d(xx, kk, padding=1)
    (gx,) = torch.autograd.grad(y, [xx if wrt == "x" else kk], g)
    return gx

  # The autograd rows include the layer's forward (autograd needs it); the
  # forward time is subtracted to report the backward alone.
  f = _median_ms(fwd, steps)
  return {
      "fwd": f,
      "dx": max(_median_ms(lambda: grad("x"), steps) - f, 0.0),
      "dw": max(_median_ms(lambda: grad("w"), steps) - f, 0.0),
  }


def isa_environment(isa: str) -> dict[str, str]:
  """The environment that caps XLA, oneDNN and ATen at ``isa`` (e.g. ``AVX2``)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--xla_cpu_max_isa={isa.upper()}" not in flags.split():
    flags = f"{flags} --xla_cpu_max_isa={isa.upper()}".strip()
  return {
      "XLA_FLAGS": flags,
      "ONEDNN_MAX_CPU_ISA": isa.upper(),
      "ATEN_CPU_CAPABILITY": isa.lower(),
  }


def main(argv=None) -> int:
  from masc_jax.configs import common as cfg

  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--impls", default="xla,im2col")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument(
      "--layers",
      default="",
      help="comma list of layer indices (default: all 13)",
  )
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--torch-threads", type=int, default=0)
  p.add_argument(
      "--max-isa",
      default="",
      help="e.g. AVX2: cap the ISA of XLA (--xla_cpu_max_isa), oneDNN and ATen",
  )
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.max_isa:
    env = isa_environment(args.max_isa)
    if any(os.environ.get(k) != v for k, v in env.items()):
      if "jax" in sys.modules or "torch" in sys.modules:
        # Too late for this process (XLA reads its flags once): run in a fresh one.
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.conv_layers",
            *(sys.argv[1:] if argv is None else argv),
        ]
        return subprocess.run(cmd, env={**os.environ, **env}).returncode
      os.environ.update(env)
  impls = [i for i in args.impls.split(",") if i]
  layers = expert_layers(cfg.EXPERT_WIDTHS, cfg.POOL_AFTER)
  if args.layers:
    wanted = {int(i) for i in args.layers.split(",")}
    layers = [l for l in layers if l[0] in wanted]
  if args.torch:
    import torch

    torch.set_num_threads(args.torch_threads or os.cpu_count())
  print(
      f"# conv3x3 layers, batch {args.batch}; {common.cpu_model()}, {os.cpu_count()} cores; "
      f"load {common.loadavg()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
      + (
          f"; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')!r}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')!r}"
          if args.max_isa
          else ""
      ),
      flush=True,
  )
  headers = ["layer", "HxW", "Cin->Cout", "GFLOP fwd"]
  cols = impls + (["torch"] if args.torch else [])
  for c in cols:
    headers += [f"{c} fwd", f"{c} dx", f"{c} dw"]
  rows, records = [], []
  totals = {c: np.zeros(3) for c in cols}
  for i, h, w, cin, cout in layers:
    row = [
        i,
        f"{h}x{w}",
        f"{cin}->{cout}",
        2 * 9 * cin * cout * h * w * args.batch / 1e9,
    ]
    rec = {"layer": i, "h": h, "w": w, "cin": cin, "cout": cout}
    for c in cols:
      plan = tuned_plan(h, w, cin, cout, args.batch) if c == "tuned" else None
      t = (
          torch_times(h, w, cin, cout, args.batch, args.steps)
          if c == "torch"
          else jax_times(h, w, cin, cout, args.batch, c, args.steps)
      )
      if plan is None:
        row += [t["fwd"], t["dx"], t["dw"]]
      else:
        row += [f"{t[p]:.3g} ({plan[p]['impl']})" for p in ("fwd", "dx", "dw")]
        rec["tuned_plan"] = plan
      rec[c] = t
      totals[c] += [t["fwd"], t["dx"], t["dw"]]
    rows.append(row)
    records.append(rec)
    print(
        f"layer {i} done (load {common.loadavg()})", file=sys.stderr, flush=True
    )
  rows.append(
      ["sum", "", "", sum(r[3] for r in rows)]
      + [v for c in cols for v in totals[c]]
  )
  table = common.markdown_table(headers, rows)
  print(table)
  print(f"(ms, median of {args.steps}; load after: {common.loadavg()})")
  if args.out:
    common.write_json(
        args.out,
        {"layers": records, "table": table, "machine": common.machine_info()},
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
