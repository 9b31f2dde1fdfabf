"""masc_jax: MASC (Multi-Agent Socialized Collaboration, ICML 2024) in JAX/Flax.

The package by job; imports run downwards only (each layer uses the ones
below it, never the ones above):

  main, launch_local       the commands
  training/                a run: the society, the stage table, the loop,
                           checkpoints, workdir guards, populations
  config_lib, configs/     configs by name, overrides, validation, members
  method/                  the method as pure functions: losses, routing,
                           metrics, stacked agents, the train steps
  nn/                      the network and its convolution kernels
  data/                    datasets, class groups and batch orders, augmentation
  parallel/                device mesh, several processes, compilation cache
  reporting/               results.json / results.md, figures, statistics,
                           progress lines (uses none of the layers above)
  paths                    local and gs:// files (used by every layer)
"""
