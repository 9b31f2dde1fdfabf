"""Devices and processes: the (members, agents, data) mesh, multi-process runs, the compilation cache."""
