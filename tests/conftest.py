import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Offline machines (CI) read tiny-shakespeare from the shared copy next to the checkout.
SHARED_INPUT = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
if not os.environ.get('TINYSHAKESPEARE_PATH') and os.path.exists(SHARED_INPUT):
    os.environ['TINYSHAKESPEARE_PATH'] = os.path.abspath(SHARED_INPUT)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped on CPU-only machines)')
    config.addinivalue_line('markers', 'slow: takes more than a few seconds')
    # PLANT=<name>: run the tests with one of tests/planted.py's bugs put in (tests/test_planted.py does)
    name = os.environ.get('PLANT')
    if name:
        import planted
        try:
            planted.plant(name)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    if os.environ.get('PLANT'):
        return f"planted bug: {os.environ['PLANT']} (tests/planted.py)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def input_txt():
    """The tiny-shakespeare text file. Its absence is a failure, not a skip: the data tests must run."""
    path = os.environ.get('TINYSHAKESPEARE_PATH')
    assert path and os.path.exists(path), (
        "tiny-shakespeare input.txt not found: set TINYSHAKESPEARE_PATH or provide ../shared/data/tinyshakespeare")
    return path


@pytest.fixture(scope='session')
def prepared(request):
    """data/shakespeare_char/{train,val}.bin + meta.pkl, prepared once (the GPU machine gets the prepared
    files, not the text)."""
    import importlib.util
    d = os.path.join(ROOT, 'data', 'shakespeare_char')
    if not all(os.path.exists(os.path.join(d, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')):
        input_txt = request.getfixturevalue('input_txt')
        spec = importlib.util.spec_from_file_location('prepare', os.path.join(d, 'prepare.py'))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.prepare(input_txt, d)
    return d
