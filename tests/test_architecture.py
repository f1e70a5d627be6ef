"""The module graph is one-way (docs/architecture.md): no import cycle among ftjax's modules, no function-local
import of an ftjax module; the commands live in ftjax/cli/ and nothing in the library imports them; and
`ftjax.generate` / `ftjax.load_pretrained` stay the functions whatever modules a program imports. Among the tests,
no test module imports another.

The graph is read from the source with `ast`: top-level and function-local imports, relative ones resolved;
`from ftjax.x import y` is an edge to `ftjax.x.y` when that is a module, else to `ftjax.x`. Importing a module
also runs its packages' `__init__` (`ftjax.models.adapters` runs `ftjax/models/__init__.py`), so such an import
is also an edge to each enclosing sub-package the importer is not itself inside. The top package `ftjax` is the
exception: every import runs ftjax/__init__.py first, which imports the functions `generate` and
`load_pretrained` (the top of the graph), so only an explicit import of `ftjax` (e.g. `from ftjax import
generate`) is an edge.
"""
import ast
import pathlib
import re
import subprocess
import sys

from tests import tiny

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'ftjax'
CLI = 'ftjax.cli'  # the commands: flags, `__main__`, absl's app.run and argparse live only here
SHIM_LINES = 12  # `python -m ftjax.train` (the JAX convention): a few lines that import ftjax.cli and call it


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


def entry_points(known=None):
    """{module: [(line, what), ...]} of what makes a command: absl flag definitions (`DEFINE*`,
    `mark_flag(s)_as_required`), `if __name__ == '__main__'`, absl's `app.run` and argparse parsers."""
    known = known or modules()
    found = {}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            what = None
            if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                    isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__':
                what = "if __name__ == '__main__'"
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
                owner = getattr(func.value, 'id', '') if isinstance(func, ast.Attribute) else ''
                if name.startswith('DEFINE') or name in ('mark_flag_as_required', 'mark_flags_as_required',
                                                         'ArgumentParser') or (owner, name) == ('app', 'run'):
                    what = f'{owner}.{name}' if owner else name
            if what:
                found.setdefault(module, []).append((node.lineno, what))
    return {module: sorted(where) for module, where in found.items()}


def is_cli(module):
    return module == CLI or module.startswith(CLI + '.')


def shims(known=None, graph=None):
    """The modules outside ftjax/cli that are `python -m` shims: at most SHIM_LINES lines whose only ftjax import
    is `ftjax.cli` (ftjax/__main__.py, ftjax/train.py)."""
    known = known or modules()
    graph = graph or import_graph(known)
    return sorted(m for m, path in known.items() if not is_cli(m) and set(graph[m]) == {CLI}
                  and len(path.read_text().splitlines()) <= SHIM_LINES)


def test_the_command_checks_can_fail(tmp_path):
    """Planted commands outside ftjax/cli (a flag, a `__main__` block, a parser, an import of the cli) are found;
    a shim is one only while it is small and imports nothing but ftjax.cli."""
    pkg = tmp_path / PACKAGE
    (pkg / 'cli').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'cli' / '__init__.py').write_text("from absl import flags\nflags.DEFINE_string('x', None, 'x')\n")
    (pkg / 'lib.py').write_text("import argparse\nfrom absl import app, flags\nflags.DEFINE_integer('n', 1, 'n')\n"
                                "p = argparse.ArgumentParser()\nif __name__ == '__main__':\n    app.run(print)\n")
    (pkg / 'uses_cli.py').write_text('from ftjax.cli import main\nimport numpy\n' + '\n' * 20)
    (pkg / 'shim.py').write_text("import sys\nfrom ftjax import cli\nif __name__ == '__main__':\n    cli.main()\n")
    known = modules(pkg)
    found = entry_points(known)
    assert found['ftjax.lib'] == [(3, 'flags.DEFINE_integer'), (4, 'argparse.ArgumentParser'),
                                  (5, "if __name__ == '__main__'"), (6, 'app.run')]
    assert found['ftjax.cli'] == [(2, 'flags.DEFINE_string')] and 'ftjax.uses_cli' not in found
    assert shims(known) == ['ftjax.shim']  # uses_cli is too long to be a shim


def test_commands_only_in_the_cli_package():
    known = modules()
    allowed = set(shims(known))
    assert {'ftjax.__main__', 'ftjax.train'} <= allowed, allowed
    outside = {m: where for m, where in entry_points(known).items() if not is_cli(m)}
    bad = {m: where for m, where in outside.items() if m not in allowed or
           any(what != "if __name__ == '__main__'" for _, what in where)}
    assert not bad, f'commands (flags, __main__, app.run, argparse) outside ftjax/cli/: {bad}'


def test_nothing_in_the_library_imports_the_cli():
    graph = import_graph()
    allowed = set(shims(graph=graph))
    users = sorted(m for m, edges in graph.items() if not is_cli(m) and m not in allowed and
                   any(is_cli(t) for t in edges))
    assert not users, f'{users} import {CLI} (the commands); the library must not depend on them'


def test_no_module_is_named_like_an_attribute_of_the_package():
    """`import ftjax.generate` would rebind the attribute `ftjax.generate` (the function) to the module."""
    tree = ast.parse((REPO / PACKAGE / '__init__.py').read_text())
    names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert {'generate', 'load_pretrained'} <= names, names
    clash = sorted(n for n in names if f'{PACKAGE}.{n}' in modules())
    assert not clash, f'modules named like attributes of the package ftjax: {clash}'


README_EXAMPLE = '''
import importlib, pkgutil, sys, types
import numpy as np
from absl import flags
import ftjax
names = [info.name for info in pkgutil.walk_packages(ftjax.__path__, 'ftjax.')]
for name in names:
    importlib.import_module(name)
assert {{'ftjax.cli.train', 'ftjax.cli.generate', 'ftjax.eval.harness', 'ftjax.__main__'}} <= set(names), names
assert isinstance(ftjax.generate, types.FunctionType), ftjax.generate
assert isinstance(ftjax.load_pretrained, types.FunctionType), ftjax.load_pretrained
defined = [m for m in flags.FLAGS.flags_by_module_dict() if 'ftjax' in m]
assert not defined, f'importing defined absl flags: {{defined}}'
for _ in range(2):  # the README's example, twice
    model, params, tokenizer, config = pre = ftjax.load_pretrained({path!r})
    input_ids = np.asarray([tokenizer('The quick brown fox')['input_ids']])
    logits = model.apply({{'params': params}}, input_ids)          # [batch, seq, vocab]
    assert logits.shape == (*input_ids.shape, config.vocab_size), logits.shape
    new_ids = ftjax.generate(pre, input_ids[0].tolist(), max_new_tokens=4)
    assert 1 <= len(new_ids) <= 4 and all(isinstance(t, int) for t in new_ids), new_ids
print('imported', len(names), 'ftjax modules; ftjax.generate is', ftjax.generate)
'''


def test_generate_stays_the_function_after_importing_everything(tiny_llama_dir):
    """`ftjax.generate(pre, ids)` once broke ("module object is not callable") after anything imported a module
    named ftjax.generate. Every module of the package is imported (the commands too: importing defines no flag),
    then the README's Python example runs twice."""
    env = tiny.subprocess_env()
    proc = subprocess.run([sys.executable, '-c', README_EXAMPLE.format(path=tiny_llama_dir)],
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
