"""The module graph is one-way (docs/architecture.md): no import cycle among ftjax's modules, no function-local
import of an ftjax module, nothing imports the `python -m ftjax.generate` command line, and `ftjax.generate`
stays the function whatever modules a program imports. Among the tests, no test module imports another.

The graph is read from the source with `ast`: top-level and function-local imports, relative ones resolved;
`from ftjax.x import y` is an edge to `ftjax.x.y` when that is a module, else to `ftjax.x`. Importing a module
also runs its packages' `__init__` (`ftjax.models.adapters` runs `ftjax/models/__init__.py`), so such an import
is also an edge to each enclosing sub-package the importer is not itself inside. The top package `ftjax` is the
exception: every import runs ftjax/__init__.py first, which imports `ftjax.pretrained` and `ftjax.decoding`
(the top of the graph), so only an explicit import of `ftjax` (e.g. `from ftjax import generate`) is an edge.
"""
import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'ftjax'
CLI_ONLY = 'ftjax.generate'  # the command line; importing it rebinds the attribute `ftjax.generate`
FLAG_DEFINING = ('ftjax.train', 'ftjax.compile_check')  # define the absl flag --config when imported


def modules(root=REPO / PACKAGE, package=PACKAGE):
    """{dotted module name: path} of every .py file under `root` (a package's name for its __init__.py)."""
    out = {}
    for path in sorted(root.rglob('*.py')):
        parts = [package, *path.relative_to(root).with_suffix('').parts]
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


def _targets(node, module, is_package, known):
    """The ftjax modules one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split('.')[0] == PACKAGE]
    base = node.module or ''
    if node.level:  # relative: from the importer's package
        anchor = module.split('.') if is_package else module.split('.')[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
    if base.split('.')[0] != PACKAGE:
        return []
    return [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]


def import_graph(known=None):
    """{module: {imported module: [(line, 'top' or 'local')]}} for every ftjax module."""
    known = known or modules()
    graph = {}
    for module, path in known.items():
        edges = graph.setdefault(module, {})
        is_package = path.name == '__init__.py'
        own = module if is_package else module.rsplit('.', 1)[0]  # the package the module is in

        def visit(node, local):
            for child in ast.iter_child_nodes(node):
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, module, is_package, known):
                        parts = target.split('.')
                        implied = ['.'.join(parts[:i]) for i in range(2, len(parts))]  # enclosing sub-packages
                        for t in [target] + [p for p in implied if not (own + '.').startswith(p + '.')]:
                            if t != module:
                                edges.setdefault(t, []).append((child.lineno, 'local' if local else 'top'))
                visit(child, inner)
        visit(ast.parse(path.read_text(), str(path)), False)
    return graph


def cycles(graph):
    """Each strongly connected component of more than one module (or a module importing itself), as one
    concrete cycle [a, b, ..., a]; [] when the graph is one-way."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def connect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(_a_cycle(graph, component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _a_cycle(graph, component):
    """One cycle through the component's first module, by breadth-first search inside the component."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:  # back to the start: the path start -> ... -> v, then the edge v -> start
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w in component and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def _describe(graph, cycle):
    return ' -> '.join(f'{a} (line {graph[a][b][0][0]})' for a, b in zip(cycle, cycle[1:])) + f' -> {cycle[-1]}'


def test_the_checker_finds_cycles_and_local_imports(tmp_path):
    """The checks below can fail: a planted cycle (one of its imports inside a function) is found."""
    pkg = tmp_path / PACKAGE
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from ftjax import b\n')
    (pkg / 'b.py').write_text('def f():\n    from .sub import c\n')
    (pkg / 'sub' / '__init__.py').write_text('')
    (pkg / 'sub' / 'c.py').write_text('import ftjax.a\nimport numpy\n')
    graph = import_graph(modules(pkg))
    assert graph['ftjax.b'] == {'ftjax.sub.c': [(2, 'local')], 'ftjax.sub': [(2, 'local')]}
    assert cycles(graph) == [['ftjax.a', 'ftjax.b', 'ftjax.sub.c', 'ftjax.a']]
    assert cycles({'x': {'y': []}, 'y': {}}) == []


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, 'import cycles:\n' + '\n'.join(_describe(graph, c) for c in found)


def test_no_function_local_ftjax_imports():
    local = [f'{m}:{line} imports {t}' for m, edges in import_graph().items() for t, uses in edges.items()
             for line, kind in uses if kind == 'local']
    assert not local, ('function-local imports of ftjax modules (import at the top of the module; a cycle means '
                       'the code is in the wrong module):\n' + '\n'.join(sorted(local)))


def test_nothing_imports_the_generate_command_line():
    users = sorted(m for m, edges in import_graph().items() if CLI_ONLY in edges)
    assert not users, f'{users} import {CLI_ONLY}, the command line; the library is ftjax.decoding'


README_EXAMPLE = '''
import importlib, pkgutil, sys, types
import numpy as np
import {first}
import ftjax
skip = {skip!r}
for info in pkgutil.walk_packages(ftjax.__path__, 'ftjax.'):
    if info.name not in skip:
        importlib.import_module(info.name)
assert isinstance(ftjax.generate, types.FunctionType), ftjax.generate
assert isinstance(ftjax.load_pretrained, types.FunctionType), ftjax.load_pretrained
for _ in range(2):  # the README's example, twice
    model, params, tokenizer, config = pre = ftjax.load_pretrained({path!r})
    input_ids = np.asarray([tokenizer('The quick brown fox')['input_ids']])
    logits = model.apply({{'params': params}}, input_ids)          # [batch, seq, vocab]
    assert logits.shape == (*input_ids.shape, config.vocab_size), logits.shape
    new_ids = ftjax.generate(pre, input_ids[0].tolist(), max_new_tokens=4)
    assert 1 <= len(new_ids) <= 4 and all(isinstance(t, int) for t in new_ids), new_ids
print('imported', len(sys.modules), 'modules; ftjax.generate is', ftjax.generate)
'''


@pytest.mark.parametrize('first', [FLAG_DEFINING[0], *(pytest.param(f, marks=pytest.mark.slow)  # fast lane: one
                                                       for f in FLAG_DEFINING[1:])])
def test_generate_stays_the_function_after_importing_everything(tiny_llama_dir, first):
    """`ftjax.generate(pre, ids)` once broke ("module object is not callable") after anything imported the
    module ftjax.generate. Every ftjax module is imported (but the CLI, and the other flag-defining entry
    point: both define --config), then the README's Python example runs twice."""
    skip = {CLI_ONLY, *FLAG_DEFINING} - {first}
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', README_EXAMPLE.format(first=first, skip=skip, path=tiny_llama_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'ftjax.generate is <function generate' in proc.stdout, proc.stdout


def imported_test_modules(source, strings=True):
    """The test modules (`test_*`) a test file's source imports: in import statements, relative or not, and in
    the text of the experiment files it writes (string constants holding `from tests.test_x import ...`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split('.')[-1].startswith('test_')]
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or '').split('.')
            if base[-1].startswith('test_'):
                found.append('.' * node.level + '.'.join(base))
            elif base in (['tests'], ['']):  # `from tests import test_x`, `from . import test_x`
                found += [a.name for a in node.names if a.name.startswith('test_')]
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += re.findall(r'^\s*(?:from|import)\s+(?:tests\.)?(test_\w+)', node.value, re.MULTILINE)
    return found


def test_no_test_module_imports_another():
    """Shared helpers live in tests/tiny.py (plain functions) and tests/conftest.py (fixtures), so each test
    module can run alone and a fixture is not silently redefined by an import."""
    example = ('from tests.test_trainer import chat_data\nfrom tests import tiny, test_data\nimport tests.test_gguf\n'
               'from .test_x import y\nx = "from tests.test_sweep import z"')
    assert imported_test_modules(example) == ['tests.test_trainer', 'test_data', 'tests.test_gguf', '.test_x',
                                              'test_sweep']
    assert imported_test_modules('from tests import tiny\nfrom tests.tiny_gguf import permute\n') == []
    # (this file's own strings are the examples above)
    bad = {path.name: imported_test_modules(path.read_text(), strings=path.name != 'test_architecture.py')
           for path in sorted((REPO / 'tests').glob('*.py'))}
    bad = {name: found for name, found in bad.items() if found}
    assert not bad, (f'test files import other test modules: {bad}; move the shared code to tests/tiny.py '
                     '(functions) or tests/conftest.py (fixtures)')
