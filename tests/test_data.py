"""Data preparation: the exact split sizes, checksum enforcement, and clear errors offline."""
import importlib.util
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT


def load_prepare():
    spec = importlib.util.spec_from_file_location('prepare', os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_split_sizes(input_txt, tmp_path):
    prep = load_prepare()
    s = prep.prepare(input_txt, str(tmp_path))
    assert s['vocab_size'] == 65
    assert s['train_tokens'] == 1_003_854 and s['val_tokens'] == 111_540
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    assert len(train) == 1_003_854 and len(val) == 111_540 and train.max() < 65
    import pickle
    meta = pickle.load(open(tmp_path / 'meta.pkl', 'rb'))
    assert meta['vocab_size'] == 65 and ''.join(meta['itos'][i] for i in train[:5]) == 'First'


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
    with pytest.raises(FileNotFoundError, match='available datasets: shakespeare_char'):
        train_runner.train(None, {'dataset': 'no_such_dataset', 'device': 'cpu'})
