"""
Prepare tiny-shakespeare in GPT-2 BPE tokens (as nanoGPT's data/shakespeare does).

Writes train.bin, val.bin and test.bin (uint16 GPT-2 token ids of the first 90% of the text; of the first and
the second half of the tokens of its last 10%: the character-level dataset's rule) and manifest.json
(each file's size and sha256, checked whenever the data is loaded) next to this file. There is no meta.pkl: a
dataset without one is GPT-2 BPE, so training pads the vocabulary to 50304 (50257 rounded up to a multiple of
64, as nanoGPT does) and sample.py encodes and decodes with tiktoken.

The text comes from the same sources, with the same sha256 check, as data/shakespeare_char/prepare.py's (a
download is cached there): --input PATH, TINYSHAKESPEARE_PATH, an earlier download, then the network.
tiktoken downloads its GPT-2 files on first use; offline, point TIKTOKEN_CACHE_DIR at a directory that holds
them under the sha1 of their URLs.

    python data/shakespeare/prepare.py [--input PATH]
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# the character-level prepare's text loading (sources, checksum, download cache) and writer, not a copy of them
_spec = importlib.util.spec_from_file_location(
    'shakespeare_char_prepare', os.path.join(HERE, '..', 'shakespeare_char', 'prepare.py'))
char_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_prepare)
DatasetError = char_prepare.DatasetError


def prepare(input_path=None, out_dir=HERE):
    """Tokenise and write train.bin / val.bin / test.bin / manifest.json into out_dir. Returns a small summary dict."""
    import tiktoken
    text = char_prepare.load_text(input_path)
    n = len(text)
    # split the text, then encode each part (nanoGPT's order: no token straddles the split)
    enc = tiktoken.get_encoding('gpt2')
    train_ids = np.array(enc.encode_ordinary(text[:int(n * 0.9)]), dtype=np.uint16)  # n_vocab 50257 < 2**16
    # halves of the last 10%'s tokens: val + test is nanoGPT's val.bin, token for token
    val_ids, test_ids = char_prepare.split_heldout(np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16))
    char_prepare.write_prepared(out_dir, {'train.bin': train_ids.tobytes(), 'val.bin': val_ids.tobytes(),
                                          'test.bin': test_ids.tobytes()},
                                tokenizer='gpt2', vocab_size=enc.n_vocab, input_sha256=char_prepare.SHA256)
    print(f"length of dataset in characters: {n:,}; GPT-2 BPE: train has {len(train_ids):,} tokens; "
          f"val has {len(val_ids):,} tokens; test has {len(test_ids):,} tokens")
    return {'chars': n, 'vocab_size': enc.n_vocab, 'train_tokens': len(train_ids), 'val_tokens': len(val_ids),
            'test_tokens': len(test_ids)}


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--input', help='local copy of tinyshakespeare input.txt (checked against its sha256)')
    ap.add_argument('--out_dir', default=HERE)
    args = ap.parse_args()
    try:
        prepare(args.input, args.out_dir)
    except DatasetError as e:
        sys.exit(f"error: {e}")
