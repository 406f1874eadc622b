"""
Sample from a trained model of any model_type (nanoGPT's sample.py options).

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=500
    python sample.py --out_dir=out-delta --start=FILE:prompt.txt --temperature=0.8 --top_k=200

Decodes incrementally with the model's cache/state (--use_cache=False recomputes the whole context per token).
`python sample.py --help` lists every key with its default and meaning.
"""

import os
import sys
from contextlib import nullcontext

import torch

import model as model_lib
from runtime import TRISTATE, ConfigError, check_minimum, check_value, codec, key_table, parse_value, pick_device, user_error

HERE = os.path.dirname(os.path.abspath(__file__))

# name=(default, meaning): `--help` and docs/configuration.md are made from this table
TABLE = dict(
    out_dir=('out-shakespeare-char', "the run's folder (train_runner's out_dir)"),
    ckpt=('best', "'best' (ckpt_best.pt) or 'last' (ckpt_last.pt)"),
    start=('\n', "the prompt, or FILE:prompt.txt to read it from a file"),
    num_samples=(3, "samples to draw"),
    max_new_tokens=(500, "tokens generated per sample"),
    temperature=(0.8, "softmax temperature; 0: greedy"),
    top_k=(200, "sample among the k most likely tokens; None: all"),
    seed=(1337, "random seed"),
    device=('auto', "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'"),
    dtype=('auto', "'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float32'"),
    use_cache=(True, "decode with the model's cache/state; False: recompute the whole context per token"),
    compile=('auto', "CUDA: torch.compile the graphed decoding step (compiles once, then faster tokens); "
                     "'auto': when the tokens asked for pay for the compilation (model.compile_pays)"),
)
DEFAULTS = {k: d for k, (d, _) in TABLE.items()}
HELP = {k: h for k, (_, h) in TABLE.items()}
CHOICES = {'ckpt': ('best', 'last'), 'dtype': ('auto', 'bfloat16', 'float32'), 'compile': TRISTATE}
MINIMUM = dict(num_samples=1, max_new_tokens=1, temperature=0.0, top_k=1)


def usage():
    return '\n'.join([__doc__.strip(), '', 'keys:', key_table([(k, d, HELP[k]) for k, d in DEFAULTS.items()])])


def parse_args(argv):
    """argv (--key=value ...) -> the options, each checked against its default's type and range."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}; valid keys: {', '.join(DEFAULTS)}")
        k, v = arg[2:].split('=', 1)
        if k not in DEFAULTS:
            raise ConfigError(f"unknown option --{k}; valid keys: {', '.join(DEFAULTS)}")
        v = v if k in ('start', 'out_dir') else parse_value(v)
        cfg[k] = v if k == 'top_k' and v is None else check_value(k, v, DEFAULTS[k], CHOICES.get(k))  # top_k=None: all
    check_minimum(cfg, MINIMUM)
    dev = cfg['device']
    if not (dev in ('auto', 'cpu', 'cuda') or (dev.startswith('cuda:') and dev[5:].isdigit())):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {dev!r}")
    if cfg['compile'] is True and not (cfg['use_cache'] and pick_device(dev).startswith('cuda')):
        raise ConfigError(f"compile=True compiles the CUDA-graph decoding step: it needs CUDA and use_cache=True "
                          f"(device {pick_device(dev)!r}, use_cache {cfg['use_cache']})")
    if not cfg['start']:
        raise ConfigError("start is empty: give a prompt of at least one character (the default is a newline)")
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
    # meta.pkl's characters, or GPT-2 BPE through tiktoken for a dataset without meta.pkl
    encode, decode = codec(ckpt['config'].get('dataset', 'shakespeare_char'), ckpt['model_config']['vocab_size'])

    start = cfg['start']
    if start.startswith('FILE:'):
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    x = torch.tensor(encode(start), dtype=torch.long, device=device)[None, ...]
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
            print(decode(y[0].tolist()))
            print('---------------')


if __name__ == '__main__':
    if '-h' in sys.argv[1:] or '--help' in sys.argv[1:]:
        print(usage())
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except Exception as e:
        line = user_error(e)
        if line is None:  # not the user's making: a bug keeps its traceback
            raise
        sys.exit(f"error: {line}")
