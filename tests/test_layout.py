"""The shape of the house: the top-level modules import each other without a cycle, bench and train_runner
stay apart, the committed report is exactly what the committed result files render to (and a result README's
table what its tool prints), and every relative link in the committed markdown leads somewhere."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import report  # noqa: E402


def top_level_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py'))


def import_graph():
    """{module: {project modules it imports}}, from every import statement in the file, including those
    inside functions (a lazy import is still an edge)."""
    mods = set(top_level_modules())
    graph = {}
    for m in mods:
        with open(os.path.join(ROOT, f'{m}.py')) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split('.')[0])
        graph[m] = (deps & mods) - {m}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(m):
        colour[m] = 'grey'
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if colour.get(d) == 'grey':
                return stack[stack.index(d):] + [d]
            if d not in colour:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        colour[m] = 'black'
        return None

    for m in sorted(graph):
        if m not in colour:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_the_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {'bench', 'train_runner', 'runtime', 'report', 'model'} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert 'train_runner' not in graph['bench'] and 'bench' not in graph['train_runner']
    assert not graph['model'] & {'bench', 'train_runner', 'runtime', 'report'}  # the model needs no harness


def test_importing_bench_or_train_runner_does_not_load_the_other():
    for mod, other in (('bench', 'train_runner'), ('train_runner', 'bench')):
        code = f"import sys; import {mod}; print('{other}' in sys.modules)"
        out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == 'False', f"import {mod} loaded {other}"


def test_report_regenerates_byte_identically_from_the_committed_results(tmp_path):
    src = os.path.join(ROOT, 'results', 'full')
    out = tmp_path / 'full'
    shutil.copytree(src, out)
    report.report(str(out))
    with open(os.path.join(src, 'REPORT.md'), 'rb') as a, open(out / 'REPORT.md', 'rb') as b:
        assert a.read() == b.read(), "results/full/REPORT.md differs from what its files render to"


def test_the_packing_readme_table_is_what_its_tool_prints():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'packing_table.py'),
                          os.path.join(ROOT, 'results', 'mqar-packing')], capture_output=True, text=True, check=True)
    table = '\n'.join(out.stdout.splitlines()[:6])
    with open(os.path.join(ROOT, 'results', 'mqar-packing', 'README.md')) as f:
        assert table in f.read(), "results/mqar-packing/README.md's table differs from tools/packing_table.py's"


def test_every_relative_link_in_the_markdown_resolves():
    """README.md, docs/ and every markdown file under results/ (the run records' folders aside): each link
    [text](path) that is not a URL names a file or folder that exists, relative to the file that links it.
    Code blocks are skipped; an anchor (#...) is ignored."""
    files = ['README.md'] + glob.glob('docs/*.md', root_dir=ROOT) + \
        [f for f in glob.glob('results/**/*.md', root_dir=ROOT, recursive=True) if '/runs/' not in f]
    broken = []
    for f in files:
        with open(os.path.join(ROOT, f)) as fh:
            text = re.sub(r'```.*?```', '', fh.read(), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            path = target.split('#')[0]
            if path and not re.match(r'[a-z]+:', path) and \
                    not os.path.exists(os.path.join(ROOT, os.path.dirname(f), path)):
                broken.append(f"{f}: {target}")
    assert len(files) > 10 and not broken, broken
