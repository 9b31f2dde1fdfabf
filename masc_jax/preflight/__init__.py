"""Pre-flight: compile every program of a run for a TPU slice, on any host, and estimate it.

``python -m masc_jax.main --config=cifar100 --compile_for=v5e-8`` builds the
run's mesh on the slice's devices (libtpu's compile-only client: no TPU, no
data needed), compiles each stage's train step and evaluation program with the
run's own shardings and shapes, and reports per program whether it compiles,
its HBM per chip, and the TPU compiler's cost-model estimates (step time, FLOPs,
MFU, projected stage times). ``topology`` names slices, ``chips`` holds the
per-chip figures, ``programs`` builds the run's programs on abstract inputs,
``costs`` and ``hlo`` read what the compiler says, ``report`` writes it up and
``command`` ties them together.
"""
