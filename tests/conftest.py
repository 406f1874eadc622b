import importlib.util
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Offline machines (CI) read tiny-shakespeare and GPT-2's BPE files from the shared copy next to the checkout.
SHARED = os.path.join(ROOT, '..', 'shared', 'data')
SHARED_INPUT = os.path.join(SHARED, 'tinyshakespeare', 'input.txt')
if not os.environ.get('TINYSHAKESPEARE_PATH') and os.path.exists(SHARED_INPUT):
    os.environ['TINYSHAKESPEARE_PATH'] = os.path.abspath(SHARED_INPUT)
# tiktoken finds a download in $TIKTOKEN_CACHE_DIR under the sha1 of its URL
GPT2_BPE_FILES = {'vocab.bpe': '6d1cbeee0f20b3d9449abfede4726ed8212e3aee',
                  'encoder.json': '6c7ea1a7e38e3a7f062df639a5b80947f075ffe6'}
OFFLINE = ("tiny-shakespeare unavailable: TINYSHAKESPEARE_PATH is unset, there is no ../shared/data copy, "
           "and data/shakespeare_char/prepare.py could not download it")

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


def load_prepare(dataset='shakespeare_char'):
    """data/<dataset>/prepare.py as a module."""
    path = os.path.join(ROOT, 'data', dataset, 'prepare.py')
    spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_input(prep):
    """tiny-shakespeare's input.txt, found as a user's run finds it: TINYSHAKESPEARE_PATH (which the shared copy
    sets, above), else prepare.py's own source: its cached download, or a download checked against the sha256.
    Offline with none of these, a skip with one reason; a wrong file (checksum) stays an error."""
    path = os.environ.get('TINYSHAKESPEARE_PATH')
    if path:
        assert os.path.exists(path), f"TINYSHAKESPEARE_PATH={path} does not exist"
        return path
    try:
        prep.load_text()
    except prep.DownloadError as e:
        pytest.skip(f"{OFFLINE} ({e.reason}); set TINYSHAKESPEARE_PATH to a local copy")
    return os.path.join(prep.HERE, 'input.txt')


@pytest.fixture(scope='session')
def input_txt():
    """The tiny-shakespeare text file (see find_input)."""
    return find_input(load_prepare())


def _is_prepared(d):
    """prepare.py finished there: manifest.json (written last) and every file it lists exist, test.bin among
    them (a folder from before the test split is prepared again). load_dataset checks the files' contents."""
    import json
    m = os.path.join(d, 'manifest.json')
    files = json.load(open(m))['files'] if os.path.exists(m) else {}
    return 'test.bin' in files and all(os.path.exists(os.path.join(d, f)) for f in files)


@pytest.fixture(scope='session')
def prepared(request):
    """data/shakespeare_char/{train,val,test}.bin + meta.pkl + manifest.json, prepared once (the GPU machine gets
    the prepared files, not the text)."""
    d = os.path.join(ROOT, 'data', 'shakespeare_char')
    if not _is_prepared(d):
        load_prepare().prepare(request.getfixturevalue('input_txt'), d)
    return d


@pytest.fixture(scope='session')
def gpt2_bpe(tmp_path_factory):
    """tiktoken's GPT-2 encoding. Offline machines get its two files from the shared copy beside the checkout
    (copied under the names tiktoken caches them by); elsewhere tiktoken downloads them, as for a user."""
    import tiktoken
    shared = os.path.join(SHARED, 'gpt2-bpe')
    if not os.environ.get('TIKTOKEN_CACHE_DIR') and os.path.isdir(shared):
        cache = tmp_path_factory.mktemp('tiktoken-cache')
        for name, key in GPT2_BPE_FILES.items():
            shutil.copy(os.path.join(shared, name), cache / key)
        os.environ['TIKTOKEN_CACHE_DIR'] = str(cache)
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:  # requests' errors are OSErrors; a hash mismatch (ValueError) stays an error
        pytest.skip(f"GPT-2 BPE files unavailable: no ../shared/data/gpt2-bpe and tiktoken's download failed "
                    f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder with vocab.bpe and encoder.json "
                    f"under the sha1 of their URLs")


@pytest.fixture(scope='session')
def prepared_bpe(request, gpt2_bpe):
    """data/shakespeare/{train,val,test}.bin + manifest.json (GPT-2 BPE, no meta.pkl), prepared once."""
    d = os.path.join(ROOT, 'data', 'shakespeare')
    if not _is_prepared(d):
        load_prepare('shakespeare').prepare(request.getfixturevalue('input_txt'), d)
    return d
