"""The guides stay true to the tree: links resolve, every mutant is documented, no history words."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mutation_check  # noqa: E402  (a script beside the tests, not a package)


def guides():
  names = ["README.md"] + [
      os.path.join("docs", n)
      for n in sorted(os.listdir(os.path.join(REPO, "docs")))
      if n.endswith(".md")
  ]
  return {n: open(os.path.join(REPO, n)).read() for n in names}


def test_every_relative_link_in_the_guides_resolves():
  broken = []
  for name, text in guides().items():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
      if re.match(r"[a-z]+://", target):
        continue
      path = os.path.normpath(os.path.join(REPO, os.path.dirname(name), target))
      if not os.path.exists(path):
        broken.append(f"{name} -> {target}")
  assert not broken, broken


def test_the_guarantees_guide_names_every_mutant_of_the_mutation_check():
  text = guides()[os.path.join("docs", "guarantees.md")]
  missing = [
      m.name for m in mutation_check.MUTANTS if f"`{m.name}`" not in text
  ]
  assert not missing, missing


def test_no_history_words_outside_the_build_notes():
  # The files git tracks, as a reader of a fresh clone sees them.
  tracked = subprocess.run(
      ["git", "ls-files"], cwd=REPO, capture_output=True, text=True
  ).stdout.split()
  if not tracked:
    pytest.skip("not a git checkout: no list of tracked files")
  pattern = re.compile(r"session [0-9]|issue [0-9]|round [0-9]", re.I)
  found = []
  for name in tracked:
    if name == "BUILD_NOTES.md" or not os.path.isfile(os.path.join(REPO, name)):
      continue
    try:
      text = open(os.path.join(REPO, name), encoding="utf-8").read()
    except UnicodeDecodeError:
      continue
    found += [
        f"{name}:{i}"
        for i, l in enumerate(text.splitlines(), 1)
        if pattern.search(l)
    ]
  assert not found, found


def test_the_readme_layout_table_names_every_module():
  layout = guides()["README.md"].split("## Layout", 1)[1].split("\n## ", 1)[0]
  package = os.path.join(REPO, "masc_jax")
  missing = []
  for folder, _, files in os.walk(package):
    for name in files:
      if not name.endswith(".py") or name == "__init__.py":
        continue
      relative = os.path.relpath(os.path.join(folder, name), package)
      # A config file may be named as its config (`digits` for configs/digits.py).
      names = {f"`{name}`", f"`masc_jax/{relative}`"}
      if os.path.basename(folder) == "configs":
        names.add(f"`{name[:-3]}`")
      if not any(n in layout for n in names):
        missing.append(relative)
  for folder in sorted(os.listdir(package)):
    if os.path.isdir(os.path.join(package, folder)) and folder != "__pycache__":
      if f"`masc_jax/{folder}/`" not in layout and f"`{folder}/`" not in layout:
        missing.append(folder + "/")
  assert not missing, missing
