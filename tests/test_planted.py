"""The tests can fail: each bug of tests/planted.py, put in by `PLANT=<name> python -m pytest`, makes the tests
listed for it fail (real failures, not errors of the planting), and the same tests pass without it."""

import os
import re
import subprocess
import sys

import pytest
import torch

from planted import PLANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pytest(node_ids, plant=None, extra=()):
    env = {k: v for k, v in os.environ.items() if k != 'PLANT'}
    env.setdefault('OMP_NUM_THREADS', '1')
    if plant:
        env['PLANT'] = plant
    cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *extra, *node_ids]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def summary(out):
    lines = [l for l in out.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ''


def assert_caught(name, node_ids, extra=()):
    rc, out = run_pytest(node_ids, plant=name, extra=extra)
    last = summary(out)
    # exit code 1 = some tests failed; 2-4 = interrupted, internal or usage error (the planting broke)
    assert rc == 1 and re.search(r'\b\d+ failed\b', last) and 'error' not in last, \
        f"planted bug {name!r} was not caught by {node_ids} (exit {rc}):\n{out[-3000:]}"


def assert_passes(node_ids, extra=()):
    rc, out = run_pytest(node_ids, extra=extra)
    assert rc == 0 and 'failed' not in summary(out), f"{node_ids} fail without a planted bug:\n{out[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize('name', list(PLANTS))
def test_planted_bug_is_caught_on_cpu(name):
    assert_caught(name, PLANTS[name][1])


@pytest.mark.slow
def test_cpu_subsets_pass_without_a_planted_bug():
    assert_passes(sorted({n for _, cpu, _ in PLANTS.values() for n in cpu}))


def test_unknown_plant_is_a_usage_error():
    rc, out = run_pytest(['tests/test_planted.py::test_unknown_plant_is_a_usage_error'], plant='no_such_bug')
    assert rc == 4 and 'valid: ' + ', '.join(PLANTS) in out, out[-2000:]


CUDA_PLANTS = [n for n, (_, _, cuda) in PLANTS.items() if cuda]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', CUDA_PLANTS)
def test_planted_bug_is_caught_on_cuda(name):
    """The same with the CUDA tests named for each bug (those run in this process first, so fla's autotuning
    results are in Triton's cache already)."""
    ids = PLANTS[name][2]
    if all('test_fla_layers.py' in n for n in ids):
        try:
            import fla.layers  # noqa: F401
        except Exception as e:
            pytest.skip(f"its CUDA tests need fla.layers (flash-linear-attention), which does not import: {e}")
    assert_caught(name, ids, extra=('-m', 'cuda'))
