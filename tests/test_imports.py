"""No import cycle in metal_jax/, lazy (function-local) imports included.

Every `import` / `from ... import` statement anywhere in a module's source counts as an edge
to the metal_jax module it names (`from pkg import name` is an edge to pkg.name when that is a
module, else to pkg's __init__). Library modules never import a command's body (run_*).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'metal_jax'


def module_names() -> dict[str, Path]:
  out = {}
  for path in PKG.rglob('*.py'):
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def import_graph() -> dict[str, set[str]]:
  mods = module_names()
  graph = {m: set() for m in mods}
  for mod, path in mods.items():
    is_pkg = path.name == '__init__.py'
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # relative import
          anchor = mod.split('.') if is_pkg else mod.split('.')[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = '.'.join(anchor + ([base] if base else []))
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in mods else base for a in node.names]
      for t in targets:
        while t and t not in mods:  # `import metal_jax.x.y` where only metal_jax.x is ours...
          t = t.rpartition('.')[0]
        if t and t != mod:
          graph[mod].add(t)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a list of nodes (first == last), or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 'open':
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 'done'
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_graph_sees_lazy_imports():
  graph = import_graph()
  # run_train imports experiment and training at the top; train() itself imports nothing lazily
  assert {'metal_jax.experiment', 'metal_jax.training'} <= graph['metal_jax.run_train']
  assert 'metal_jax.models.hf' in graph['metal_jax']  # the package's own re-export


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_library_never_imports_a_command_body():
  graph = import_graph()
  bodies = {m for m in graph if m.rpartition('.')[2].startswith('run_')}
  for mod, deps in graph.items():
    if mod not in bodies:
      assert not deps & bodies, (mod, deps & bodies)
