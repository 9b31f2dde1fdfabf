"""The package's layout holds: imports run one way between subpackages, no cycles, no private names.

The import graph is read from the source (``ast``), every ``import`` and
``from ... import`` of a ``masc_jax`` module counted, including those inside
functions and under ``TYPE_CHECKING``: a cycle hidden in a function is still
a cycle for a reader.
"""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "masc_jax")

# Each layer may import itself and the layers listed after it, never those before.
LAYERS = (
    ("main", "launch_local", "preflight"),
    ("training",),
    ("config_lib", "configs"),
    ("method",),
    ("nn",),
    ("data", "parallel", "reporting"),
    ("paths",),
)
# Within the bottom layers, these must not import each other's packages.
INDEPENDENT = ("data", "parallel", "reporting")


def _module_name(path):
  rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules():
  """``{module: [(imported module, [imported names]), ...]}`` for every module."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      module = _module_name(path)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      edges = []
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          edges += [
              (a.name, []) for a in node.names if a.name.startswith("masc_jax")
          ]
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        ):
          if not node.module.startswith("masc_jax"):
            continue
          for alias in node.names:
            candidate = f"{node.module}.{alias.name}"
            if os.path.exists(
                os.path.join(REPO, *candidate.split(".")) + ".py"
            ) or (os.path.isdir(os.path.join(REPO, *candidate.split(".")))):
              edges.append((candidate, []))  # a module imported by name
            else:
              edges.append((node.module, [alias.name]))
      out[module] = edges
  return out


def _unit(module):
  """``masc_jax.training.train`` -> ``training``; ``masc_jax.paths`` -> ``paths``."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _layer(unit):
  for index, units in enumerate(LAYERS):
    if unit in units:
      return index
  raise AssertionError(
      f"masc_jax.{unit} is in no layer of tests/test_layout.py"
  )


def test_no_import_cycles_between_modules():
  graph = {
      m: {t for t, _ in edges if t in _modules_cache}
      for m, edges in _modules_cache.items()
  }
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "import cycles: " + "; ".join(
      " -> ".join(c) for c in cycles
  )


def test_imports_run_downwards_between_subpackages():
  wrong = []
  for module, edges in _modules_cache.items():
    source = _unit(module)
    for target, _ in edges:
      if target == "masc_jax":
        continue
      dest = _unit(target)
      if dest == source:
        continue
      if _layer(dest) < _layer(source) or (
          source in INDEPENDENT and dest in INDEPENDENT
      ):
        wrong.append(f"{module} imports {target}")
  assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_private_name_is_imported_from_another_module():
  private = [
      f"{module} imports {target}.{name}"
      for module, edges in _modules_cache.items()
      for target, names in edges
      for name in names
      if name.startswith("_") and target != module
  ]
  assert not private, "\n".join(private)


def test_no_private_attribute_of_another_module_is_used():
  """``module._name`` where ``module`` is a masc_jax module imported by name."""
  wrong = []
  for root, _, files in os.walk(PACKAGE):
    for file_name in files:
      if not file_name.endswith(".py"):
        continue
      path = os.path.join(root, file_name)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      local_modules = {}
      for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("masc_jax")
        ):
          for alias in node.names:
            candidate = os.path.join(
                REPO, *f"{node.module}.{alias.name}".split(".")
            )
            if os.path.exists(candidate + ".py"):
              local_modules[alias.asname or alias.name] = (
                  f"{node.module}.{alias.name}"
              )
      for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in local_modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
          wrong.append(
              f"{_module_name(path)}:{node.lineno} uses {local_modules[node.value.id]}.{node.attr}"
          )
  assert not wrong, "\n".join(wrong)


def test_the_checks_see_the_package():
  # A broken reader would make every check above pass vacuously.
  assert "masc_jax.training.train" in _modules_cache
  train_imports = {t for t, _ in _modules_cache["masc_jax.training.train"]}
  assert "masc_jax.training.protocol" in train_imports
  assert _layer("reporting") > _layer("training")


_modules_cache = _modules()
