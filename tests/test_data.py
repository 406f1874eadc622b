"""Data preparation and loading: the exact split sizes (characters and GPT-2 BPE), checksum enforcement, the
manifest that loading checks, block_size against the data, clear errors for damaged files, and how the tests
find the text (a download when there is no local copy, a skip when offline)."""
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

import conftest
import model as model_lib
import runtime
import train_runner
from conftest import load_prepare

TINY = dict(n_layer=1, n_head=2, n_embd=32, batch_size=4, dropout=0.0, device='cpu', compile=False,
            max_iters=2, eval_interval=2, eval_iters=1, log_interval=1)


def test_prepare_split_sizes(input_txt, tmp_path):
    prep = load_prepare()
    s = prep.prepare(input_txt, str(tmp_path))
    assert s['vocab_size'] == 65
    assert s['train_tokens'] == 1_003_854 and s['val_tokens'] == 55_770 and s['test_tokens'] == 55_770
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    test = np.fromfile(tmp_path / 'test.bin', dtype=np.uint16)
    assert len(train) == 1_003_854 and len(val) == 55_770 and len(test) == 55_770 and train.max() < 65
    # train stays nanoGPT's first 90%; val then test is the last 10% in order (nanoGPT's val set)
    text = open(input_txt, encoding='utf-8').read()
    stoi = pickle.load(open(tmp_path / 'meta.pkl', 'rb'))['stoi']
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    assert (train == ids[:1_003_854]).all() and (np.concatenate([val, test]) == ids[1_003_854:]).all()
    meta = pickle.load(open(tmp_path / 'meta.pkl', 'rb'))
    assert meta['vocab_size'] == 65 and ''.join(meta['itos'][i] for i in train[:5]) == 'First'
    # the record that loading checks: each file's size and sha256
    manifest = json.load(open(tmp_path / 'manifest.json'))
    assert set(manifest['files']) == {'train.bin', 'val.bin', 'test.bin', 'meta.pkl'}
    for name, rec in manifest['files'].items():
        data = (tmp_path / name).read_bytes()
        assert rec == {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
    assert manifest['files']['train.bin']['bytes'] == 2 * 1_003_854


def test_corrupt_checksum_fails(input_txt, tmp_path):
    prep = load_prepare()
    bad = tmp_path / 'input.txt'
    shutil.copy(input_txt, bad)
    with open(bad, 'r+b') as f:  # flip one character
        f.seek(1000)
        c = f.read(1)
        f.seek(1000)
        f.write(b'X' if c != b'X' else b'Y')
    with pytest.raises(prep.DatasetError, match='checksum mismatch'):
        prep.prepare(str(bad), str(tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'train.bin').exists()


def test_offline_without_local_copy_says_what_to_do(tmp_path, monkeypatch):
    prep = load_prepare()
    monkeypatch.delenv('TINYSHAKESPEARE_PATH', raising=False)
    monkeypatch.setattr(prep, 'HERE', str(tmp_path))  # no cached input.txt there

    def no_network(*a, **k):
        raise OSError('network is unreachable')
    monkeypatch.setattr(prep.urllib.request, 'urlopen', no_network)
    with pytest.raises(prep.DatasetError, match='--input PATH'):
        prep.prepare(None, str(tmp_path))


def test_missing_input_path(tmp_path):
    prep = load_prepare()
    with pytest.raises(prep.DatasetError, match='does not exist'):
        prep.prepare(str(tmp_path / 'nope.txt'), str(tmp_path))


def test_missing_dataset_names_available(prepared):
    import train_runner
    with pytest.raises(FileNotFoundError, match='available datasets: shakespeare, shakespeare_char'):
        train_runner.train(None, {'dataset': 'no_such_dataset', 'device': 'cpu'})


# ---------------------------------------------------------------------------------------------- GPT-2 BPE


def test_bpe_prepare_split_sizes(input_txt, gpt2_bpe, tmp_path):
    """nanoGPT's data/shakespeare: 301,966 train tokens; its 36,059 val tokens split in halves, val 18,030 and
    test 18,029; no meta.pkl."""
    s = load_prepare('shakespeare').prepare(input_txt, str(tmp_path))
    assert s['train_tokens'] == 301_966 and s['val_tokens'] == 18_030 and s['test_tokens'] == 18_029
    assert s['vocab_size'] == 50257
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    test = np.fromfile(tmp_path / 'test.bin', dtype=np.uint16)
    assert len(train) == 301_966 and len(val) == 18_030 and len(test) == 18_029
    text = open(input_txt, encoding='utf-8').read()
    n = int(len(text) * 0.9)
    assert gpt2_bpe.decode(train.tolist()) == text[:n]
    assert gpt2_bpe.decode(val.tolist() + test.tolist()) == text[n:]  # nanoGPT's val.bin, token for token
    assert not (tmp_path / 'meta.pkl').exists()
    assert set(json.load(open(tmp_path / 'manifest.json'))['files']) == {'train.bin', 'val.bin', 'test.bin'}


@pytest.mark.parametrize('model_type', ['vanilla', 'delta'])
def test_bpe_dataset_trains(prepared_bpe, tmp_path, model_type):
    """dataset=shakespeare: no meta.pkl, so the vocabulary is GPT-2's padded as nanoGPT pads (50304)."""
    tiny = model_lib.get_model_module(model_type).TINY
    s = train_runner.train(None, {**TINY, **tiny, 'model_type': model_type, 'dataset': 'shakespeare',
                                  'block_size': 32, 'out_dir': str(tmp_path)})
    rec = json.load(open(tmp_path / 'config.json'))
    assert rec['model_config']['vocab_size'] == 50304
    assert s['iters'] == 2 and 9 < s['final_val_loss'] < 12  # ln(50304) = 10.8 for a uniform guess


# ---------------------------------------------------------------------------------------------- the data fixture


def test_data_fixture_downloads_without_a_local_copy_and_skips_offline(tmp_path, monkeypatch):
    """No TINYSHAKESPEARE_PATH and no cached copy: the fixture takes prepare.py's download path (checksum
    checked, cached); with the download failing it skips with the one reason."""
    prep = load_prepare()
    monkeypatch.delenv('TINYSHAKESPEARE_PATH', raising=False)
    monkeypatch.setattr(prep, 'HERE', str(tmp_path))  # no cached input.txt there
    text = b'First Citizen:\nBefore we proceed any further, hear me speak.\n'
    monkeypatch.setattr(prep, 'SHA256', hashlib.sha256(text).hexdigest())
    fetched = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return text

    def urlopen(url, timeout):
        fetched.append(url)
        return Response()
    monkeypatch.setattr(prep.urllib.request, 'urlopen', urlopen)
    path = conftest.find_input(prep)
    assert fetched == [prep.URL] and path == os.path.join(str(tmp_path), 'input.txt')
    assert open(path, 'rb').read() == text
    assert conftest.find_input(prep) == path and len(fetched) == 1  # the cached copy, no second download

    os.remove(path)

    def offline(url, timeout):
        raise OSError('network is unreachable')
    monkeypatch.setattr(prep.urllib.request, 'urlopen', offline)
    with pytest.raises(pytest.skip.Exception, match=r'tiny-shakespeare unavailable.*could not download it '
                                                     r'\(network is unreachable\)'):
        conftest.find_input(prep)


def test_data_fixture_does_not_skip_a_wrong_download(tmp_path, monkeypatch):
    """A download with the wrong checksum is an error, never a skip."""
    prep = load_prepare()
    monkeypatch.delenv('TINYSHAKESPEARE_PATH', raising=False)
    monkeypatch.setattr(prep, 'HERE', str(tmp_path))

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b'not shakespeare'
    monkeypatch.setattr(prep.urllib.request, 'urlopen', lambda url, timeout: Response())
    with pytest.raises(prep.DatasetError, match='expected'):
        conftest.find_input(prep)


# ---------------------------------------------------------------------------------------------- loading checks


@pytest.fixture
def data_root(tmp_path, monkeypatch, prepared):
    """A data/ folder of our own, holding a copy of the prepared shakespeare_char (prepare.py included)."""
    root = tmp_path / 'data'
    shutil.copytree(prepared, root / 'shakespeare_char', ignore=shutil.ignore_patterns('__pycache__'))
    monkeypatch.setattr(runtime, 'DATA_DIR', str(root))
    return root


def make_dataset(root, name, train_ids, val_ids, meta=None, manifest=True):
    """A prepared dataset of given token ids, written as prepare.py writes one (or without its manifest)."""
    files = {'train.bin': np.asarray(train_ids, np.uint16).tobytes(),
             'val.bin': np.asarray(val_ids, np.uint16).tobytes()}
    if meta is not None:
        files['meta.pkl'] = meta
    load_prepare().write_prepared(str(root / name), files)
    if not manifest:
        os.remove(root / name / 'manifest.json')
    return root / name


@pytest.mark.parametrize('damage', ['truncated', 'changed'])
def test_damaged_bin_says_rerun_prepare(data_root, tmp_path, damage):
    """A train.bin truncated to half (or with one token changed) must not train on what is left."""
    p = data_root / 'shakespeare_char' / 'train.bin'
    data = p.read_bytes()
    if damage == 'truncated':
        p.write_bytes(data[:len(data) // 2])
    else:
        p.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    with pytest.raises(runtime.DatasetError, match=r'rerun `python data/shakespeare_char/prepare.py`'):
        train_runner.train(None, {**TINY, 'block_size': 32, 'out_dir': str(tmp_path / 'out')})


def test_a_folder_without_manifest_is_prepared_again(data_root, capsys):
    """A folder from a prepare.py that wrote no manifest can't be checked: loading prepares it anew."""
    d = data_root / 'shakespeare_char'
    os.remove(d / 'manifest.json')
    (d / 'train.bin').write_bytes((d / 'train.bin').read_bytes()[:1000])  # damage the unrecorded file
    splits, meta = runtime.load_dataset('shakespeare_char', 'cpu')
    assert 'no manifest.json' in capsys.readouterr().out
    assert len(splits['train']) == 1_003_854 and meta['vocab_size'] == 65 and (d / 'manifest.json').exists()


def test_a_folder_without_manifest_and_no_text_is_a_clear_error(data_root, monkeypatch):
    """Offline, with no text to prepare it from again (a GPU machine sent the .bin files only): one line."""
    d = data_root / 'shakespeare_char'
    os.remove(d / 'manifest.json')
    if (d / 'input.txt').exists():
        os.remove(d / 'input.txt')
    monkeypatch.delenv('TINYSHAKESPEARE_PATH', raising=False)

    def offline(*a, **k):
        raise OSError('network is unreachable')
    monkeypatch.setattr('urllib.request.urlopen', offline)
    with pytest.raises(runtime.DatasetError, match='no manifest.json to check its files against, and preparing '
                                                   'it again failed: could not download'):
        runtime.load_dataset('shakespeare_char', 'cpu')


@pytest.mark.parametrize('content', [b'', b'garbage, not a pickle', 'truncated'])
@pytest.mark.parametrize('manifest', [True, False])
def test_corrupt_meta_pkl_names_the_file(data_root, tmp_path, content, manifest):
    """Empty, garbage or truncated meta.pkl: an error naming the file that says to rerun prepare.py, not
    an UnpicklingError/EOFError. Without a manifest (nothing to compare with) the unpickling itself fails."""
    meta = (data_root / 'shakespeare_char' / 'meta.pkl').read_bytes()
    d = make_dataset(data_root, 'tiny', np.arange(200) % 65, np.arange(100) % 65, meta=meta, manifest=manifest)
    (d / 'meta.pkl').write_bytes(meta[:len(meta) // 2] if content == 'truncated' else content)
    with pytest.raises(runtime.DatasetError, match=r'meta\.pkl.*rerun') as e:
        train_runner.train(None, {**TINY, 'dataset': 'tiny', 'block_size': 8, 'out_dir': str(tmp_path / 'out')})
    assert str(d / 'meta.pkl') in str(e.value)


def test_block_size_against_the_data(data_root, tmp_path):
    """A window takes block_size + 1 tokens: 17 tokens per split fit block_size 16 exactly (every training and
    evaluation window is the whole split), and block_size 17 is one clear line, not a random_ error deep in
    training."""
    meta = (data_root / 'shakespeare_char' / 'meta.pkl').read_bytes()
    make_dataset(data_root, 'tiny', np.arange(17) % 65, np.arange(17) % 65, meta=meta)
    run = {**TINY, 'dataset': 'tiny', 'out_dir': str(tmp_path / 'out')}
    s = train_runner.train(None, {**run, 'block_size': 16})
    assert s['iters'] == 2
    with pytest.raises(runtime.ConfigError, match='block_size 17 exceeds the 17 tokens of train'):
        train_runner.train(None, {**run, 'block_size': 17})
    make_dataset(data_root, 'empty', np.arange(40) % 65, [], meta=meta)
    with pytest.raises(runtime.ConfigError, match='block_size 16 exceeds the 0 tokens of val'):
        train_runner.train(None, {**run, 'dataset': 'empty', 'block_size': 16})


def test_block_size_limit_is_exact_on_shakespeare_char(prepared):
    """55,770 val tokens hold one window of block_size 55,769 and none of 55,770."""
    splits, _ = runtime.load_dataset('shakespeare_char', 'cpu')
    assert [len(splits[s]) for s in ('train', 'val', 'test')] == [1_003_854, 55_770, 55_770]
    runtime.check_block_size(splits, 55_769, 'shakespeare_char')
    with pytest.raises(runtime.ConfigError, match='block_size 55770 exceeds the 55,770 tokens of val'):
        runtime.check_block_size(splits, 55_770, 'shakespeare_char')


def test_a_folder_from_before_the_test_split_is_prepared_again(data_root, capsys):
    """A manifest without test.bin (an earlier prepare.py's 90/10 split): loading prepares the folder anew,
    so no run evaluates on the old, whole-10% val.bin as if it were the new val split."""
    d = data_root / 'shakespeare_char'
    m = json.load(open(d / 'manifest.json'))
    del m['files']['test.bin']
    json.dump(m, open(d / 'manifest.json', 'w'))
    os.remove(d / 'test.bin')
    splits, _ = runtime.load_dataset('shakespeare_char', 'cpu')
    assert 'no test split' in capsys.readouterr().out
    assert len(splits['val']) == len(splits['test']) == 55_770 and (d / 'test.bin').exists()
