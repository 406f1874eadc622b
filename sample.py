"""
Sample from a trained model of any model_type (nanoGPT's sample.py options).

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=500
    python sample.py --out_dir=out-delta --start=FILE:prompt.txt --temperature=0.8 --top_k=200

Decodes incrementally with the model's cache/state (--use_cache=False recomputes the whole context per token).
"""

import os
import pickle
import sys
from contextlib import nullcontext

import torch

import model as model_lib
from runtime import ConfigError, parse_value, pick_device

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    out_dir='out-shakespeare-char',
    ckpt='best',             # 'best' (ckpt_best.pt) or 'last' (ckpt_last.pt)
    start='\n',              # or "FILE:prompt.txt"
    num_samples=3,
    max_new_tokens=500,
    temperature=0.8,         # 0 -> greedy
    top_k=200,
    seed=1337,
    device='auto',
    dtype='auto',
    use_cache=True,
    compile='auto',          # CUDA: torch.compile the graphed decoding step (compiles once, then faster tokens);
                             # 'auto' = when the tokens asked for pay for the compilation (model.compile_pays)
)


def parse_args(argv):
    cfg = dict(DEFAULTS)
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}; valid keys: {', '.join(DEFAULTS)}")
        k, v = arg[2:].split('=', 1)
        if k not in DEFAULTS:
            raise ConfigError(f"unknown option --{k}; valid keys: {', '.join(DEFAULTS)}")
        cfg[k] = v if k in ('start', 'out_dir') else parse_value(v)
    return cfg


def load_model(out_dir, which='best', device='cpu'):
    """(model, checkpoint dict) from out_dir/ckpt_{which}.pt, whatever its model_type."""
    path = os.path.join(out_dir, f'ckpt_{which}.pt')
    if not os.path.exists(path):
        have = sorted(f for f in os.listdir(out_dir) if f.endswith('.pt')) if os.path.isdir(out_dir) else []
        raise FileNotFoundError(f"no checkpoint {path}; found: {have or 'nothing'} (train first, or pass --ckpt=last)")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    mcfg = ckpt['model_config']
    mod = model_lib.get_model_module(mcfg['model_type'])
    model = mod.GPT(mod.GPTConfig(**mcfg))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt


def main(argv):
    cfg = parse_args(argv)
    device = pick_device(cfg['device'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if device_type == 'cuda' else 'float32')
    if dtype not in ('float32', 'bfloat16'):
        raise ConfigError(f"dtype must be auto, bfloat16 or float32; got {dtype!r}")
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    torch.manual_seed(cfg['seed'])
    torch.cuda.manual_seed(cfg['seed']) if device_type == 'cuda' else None

    model, ckpt = load_model(cfg['out_dir'], cfg['ckpt'], device)
    dataset = ckpt['config'].get('dataset', 'shakespeare_char')
    meta_path = os.path.join(HERE, 'data', dataset, 'meta.pkl')
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} missing: run data/{dataset}/prepare.py")
    with open(meta_path, 'rb') as f:
        meta = pickle.load(f)
    stoi, itos = meta['stoi'], meta['itos']

    start = cfg['start']
    if start.startswith('FILE:'):
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        raise ConfigError(f"prompt has characters outside the vocabulary: {unknown!r}")
    x = torch.tensor([stoi[c] for c in start], dtype=torch.long, device=device)[None, ...]
    print(f"{ckpt['model_config']['model_type']} from {cfg['out_dir']} (iter {ckpt['iter_num']}, "
          f"val loss {ckpt.get('val_loss', float('nan')):.4f}), cache={'on' if cfg['use_cache'] else 'off'}")
    compile = cfg['compile']
    if compile == 'auto':  # decided once for all the samples: a compilation serves every one of them
        steps = cfg['num_samples'] * (cfg['max_new_tokens'] - 1)
        compile, why = model_lib.compile_pays(model.config.model_type, steps) \
            if device_type == 'cuda' and cfg['use_cache'] and model.static_decode else \
            (False, 'no CUDA graph to compile: that needs CUDA and use_cache=True')
        print(f"torch.compile of the decoding step: {'on' if compile else 'off'} ({why}; --compile=True or False "
              f"to choose)")
    with torch.no_grad(), ctx:
        for _ in range(cfg['num_samples']):
            st = {}
            y = model.generate(x, cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'],
                               use_cache=cfg['use_cache'], compile=compile, stats=st)
            print(f"[{st['mode']} ({st['why']}): prefill and first token {1e3 * st['prefill_s']:.1f} ms, setup "
                  f"{1e3 * st['setup_s']:.1f} ms, then {st['decode_steps']} tokens in {st['decode_s']:.3f} s"
                  + (f": {st['tokens_per_s']:,.0f} tokens/s, {st['ms_per_token']:.3f} ms/token]"
                     if st['ms_per_token'] else ']'))
            print(''.join(itos[int(i)] for i in y[0].tolist()))
            print('---------------')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
