"""
Prepare tiny-shakespeare for character-level language modelling (as nanoGPT does).

Writes train.bin, val.bin and test.bin (uint16 token ids: the first 90% of the text; the first half of the
last 10%; its second half), meta.pkl
(vocab_size, itos, stoi) and manifest.json (each file's size and sha256, checked whenever the data is loaded)
next to this file. Train is nanoGPT's; nanoGPT's val set (the whole last 10%, where its shakespeare_char run
reaches 1.4697) is val.bin + test.bin: validation chooses hyperparameters and checkpoints, test is only reported.

The text comes from, in order:
  1. --input PATH (or prepare(input_path=...)),
  2. the environment variable TINYSHAKESPEARE_PATH,
  3. input.txt next to this script (from an earlier download),
  4. a download from the char-rnn repository.
Whatever the source, its sha256 must be the canonical one: a wrong file is an error, never a
silently different dataset.

    python data/shakespeare_char/prepare.py [--input PATH]
"""

import argparse
import hashlib
import json
import os
import pickle
import sys
import urllib.request

import numpy as np

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
HERE = os.path.dirname(os.path.abspath(__file__))


class DatasetError(RuntimeError):
    """The dataset can't be prepared (no network and no local copy, or a checksum mismatch)."""


class DownloadError(DatasetError):
    """No local copy, and the download failed (offline?). `reason` is the network's error."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _read_verified(path, what):
    with open(path, 'rb') as f:
        data = f.read()
    digest = _sha256(data)
    if digest != SHA256:
        raise DatasetError(f"checksum mismatch for {what} {path}: sha256 {digest}, expected {SHA256}. "
                           f"The file is corrupt or not tiny-shakespeare; delete it or pass the right --input.")
    return data


def load_text(input_path=None):
    """The verified tiny-shakespeare text, from the first available source (see module docstring)."""
    input_path = input_path or os.environ.get('TINYSHAKESPEARE_PATH')
    if input_path:
        if not os.path.exists(input_path):
            raise DatasetError(f"input file {input_path} does not exist")
        return _read_verified(input_path, 'input').decode('utf-8')
    cached = os.path.join(HERE, 'input.txt')
    if os.path.exists(cached):
        return _read_verified(cached, 'cached download').decode('utf-8')
    print(f"downloading tiny-shakespeare from {URL}")
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise DownloadError(
            f"could not download tiny-shakespeare ({e}). Offline? Pass a local copy of the char-rnn "
            f"tinyshakespeare input.txt (sha256 {SHA256}) with "
            f"`python data/shakespeare_char/prepare.py --input PATH` or set TINYSHAKESPEARE_PATH=PATH.",
            str(e)) from None
    if _sha256(data) != SHA256:
        raise DatasetError(f"downloaded file has sha256 {_sha256(data)}, expected {SHA256}; not saved")
    with open(cached, 'wb') as f:
        f.write(data)
    return data.decode('utf-8')


def write_prepared(out_dir, files, **info):
    """Write {name: bytes} into out_dir, then manifest.json with each file's size and sha256 (and `info`).
    Loading checks every file against the manifest, so a truncated or changed .bin is an error, never a
    silently smaller dataset. Each file goes to a temp name and is renamed: a killed prepare leaves no
    half-written file. The manifest goes last and is removed first: a folder with a manifest was written whole."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, 'manifest.json')
    if os.path.exists(manifest):
        os.remove(manifest)
    record = {'files': {}, **info}
    for name, data in files.items():
        tmp = os.path.join(out_dir, f'{name}.tmp{os.getpid()}')
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
        record['files'][name] = {'bytes': len(data), 'sha256': _sha256(data)}
    tmp = f'{manifest}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, manifest)


def split_heldout(ids):
    """The last 10% of the tokens -> (val, test): its first half and its second half (val gets the extra token
    of an odd count). val + test, concatenated, is nanoGPT's val set."""
    half = (len(ids) + 1) // 2
    return ids[:half], ids[half:]


def prepare(input_path=None, out_dir=HERE):
    """Tokenise and write train.bin / val.bin / test.bin / meta.pkl / manifest.json into out_dir. Returns a
    small summary."""
    text = load_text(input_path)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(text)
    train_ids = np.array([stoi[c] for c in text[:int(n * 0.9)]], dtype=np.uint16)
    val_ids, test_ids = split_heldout(np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16))
    meta = pickle.dumps({'vocab_size': len(chars), 'itos': itos, 'stoi': stoi})
    write_prepared(out_dir, {'train.bin': train_ids.tobytes(), 'val.bin': val_ids.tobytes(),
                             'test.bin': test_ids.tobytes(), 'meta.pkl': meta},
                   tokenizer='char', vocab_size=len(chars), input_sha256=SHA256)
    summary = {'chars': n, 'vocab_size': len(chars), 'train_tokens': len(train_ids), 'val_tokens': len(val_ids),
               'test_tokens': len(test_ids)}
    print(f"length of dataset in characters: {n:,}; vocab size: {len(chars)}; train has {len(train_ids):,} "
          f"tokens; val has {len(val_ids):,} tokens; test has {len(test_ids):,} tokens")
    return summary


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--input', help='local copy of tinyshakespeare input.txt (checked against its sha256)')
    ap.add_argument('--out_dir', default=HERE)
    args = ap.parse_args()
    try:
        prepare(args.input, args.out_dir)
    except DatasetError as e:
        sys.exit(f"error: {e}")
