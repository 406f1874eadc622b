"""
Runtime helpers shared by train_runner.py, bench.py and sample.py: device choice and autocast, torch.compile /
CUDA-graph decisions and the graphed training step, the dataset loader, run metadata (commit, device,
library versions), CSV/JSON I/O and `--key=value` value parsing. Nothing here imports train_runner or bench.
"""

import ast
import csv
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

import model as model_lib

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')  # data/<dataset>/: prepare.py, train.bin, val.bin, [meta.pkl], manifest.json


class ConfigError(ValueError):
    pass


def parse_value(s):
    if s.lower() in ('true', 'false'):  # --compile=false must not become the (truthy) string 'false'
        return s.lower() == 'true'
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s  # a bare string such as --model_type=delta


# the values of a tri-state key such as compile or cuda_graphs
TRISTATE = (True, False, 'auto')
# the benchmarks' grids (bench.BENCH_GRIDS; bench.py --grid, the sweep's --bench_grid)
BENCH_GRID_NAMES = ('default', 'exhaustive')


def show_value(v):
    """A value as it is typed on the command line: bare where that reads back the same, else its repr."""
    if isinstance(v, str) and v and v.isprintable() and not any(c in v for c in ' \'"') and parse_value(v) == v:
        return v
    return repr(v)


def check_value(key, value, default, choices=None):
    """value, coerced to the default's type where that is lossless; a ConfigError otherwise.
    choices: the only values that may pass (True and False match only the bools): a tri-state key must get
    one of them, since any string passes a type check against its 'auto' default and bool('no') is True."""
    if choices is not None:
        if any(value is c if isinstance(c, bool) or c is None else
               (type(value) is type(c) and value == c) for c in choices):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(show_value, choices))}; got {value!r}")
    if default is None or isinstance(value, type(default)) and not (isinstance(value, bool) and
                                                                     not isinstance(default, bool)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, tuple):  # the command line's --key=1,2 is a tuple
        return list(value)
    name = type(default).__name__
    raise ConfigError(f"{key} must be {'an' if name[0] in 'aeiou' else 'a'} {name} (default {default!r}), got {value!r}")


def check_minimum(cfg, minimum):
    """ConfigError for the first key of cfg below its minimum ({key: lowest valid value})."""
    for k, lo in minimum.items():
        if k in cfg and cfg[k] is not None and cfg[k] < lo:
            raise ConfigError(f"{k} must be >= {lo}, got {cfg[k]!r}")


def key_table(rows, markdown=False):
    """rows of (key, default, meaning) as `--help` lines ('--key=default  meaning'), or as a markdown table."""
    if markdown:
        esc = lambda s: str(s).replace('|', '\\|').replace('<', '&lt;')  # no cell may read as HTML
        return '\n'.join(['| key | default | meaning |', '|---|---|---|'] +
                         [f"| `{k}` | `{esc(show_value(d))}` | {esc(h)} |" for k, d, h in rows])
    cells = [(f"--{k}={show_value(d)}", h) for k, d, h in rows]
    width = min(40, max((len(c) for c, _ in cells), default=0))
    return '\n'.join(f"  {c:<{width}}  {h}" if len(c) <= width else f"  {c}\n  {'':<{width}}  {h}" for c, h in cells)


def user_error(e, extra=()):
    """The one line to show for an error of the user's making, or None for any other (a bug: it keeps its
    traceback). The user's: a bad config or option (ConfigError: the message names the valid choices), a
    path that does not exist or can't be used (a config file, a checkpoint to resume, an out_dir), a dataset
    problem (data/<dataset>/prepare.py's DatasetError), memory (the model or batch does not fit), a full
    disk, and the classes in `extra` (train_runner: a diverging run). A plain ValueError is not among them:
    the config checks raise ConfigError, so a ValueError that reaches the command line is a bug."""
    if isinstance(e, (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                      *extra)) or type(e).__name__ == 'DatasetError':
        return str(e)
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
        return f"no space left on the device: {e}"
    if isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
            "can't allocate memory" in str(e) or 'out of memory' in str(e).lower())):
        return (f"out of memory ({model_lib.first_line(e, 200)}): the model or batch does not fit; reduce "
                f"batch_size (raise gradient_accumulation_steps to keep the global batch), block_size or the model")
    return None


def pick_device(device='auto'):
    return ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device


def device_name(device):
    if str(device).startswith('cuda'):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit():
    """HEAD's sha (+'-dirty' with uncommitted changes); GIT_COMMIT from the environment where there is
    no .git (e.g. a copy of the tree on a remote GPU machine)."""
    if os.environ.get('GIT_COMMIT'):
        return os.environ['GIT_COMMIT']
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ('-dirty' if dirty else '')) if sha else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def library_versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__}
    for name, dist in (('triton', 'triton'), ('fla', 'fla-core'), ('flash_attn', 'flash-attn'), ('tilelang', 'tilelang')):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_metadata(device=None):
    device = pick_device(device or 'auto')
    return {'command': ' '.join([os.path.basename(sys.executable)] + sys.argv), 'git_commit': git_commit(),
            'device': device_name(device), 'versions': library_versions()}


# measured peaks (dense bf16 matmul, 8192^3, random data): H200 of this project's GPU machine, 788 TFLOP/s.
# Other GPUs are measured once at start.
KNOWN_PEAK_FLOPS = {'H200': 788e12}


_peak_cache = {}


def peak_flops(device):
    """bf16 matmul peak of `device` in FLOP/s (known table, else measured once); None on CPU."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, val in KNOWN_PEAK_FLOPS.items():
        if key in name:
            return val
    if name not in _peak_cache:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(device)
        _peak_cache[name] = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0)
    return _peak_cache[name]


class DatasetError(ValueError):
    """A prepared dataset folder that can't be used as it is (changed since prepare.py wrote it, or unreadable).
    A ValueError, so the command lines print it as one line, as they print prepare.py's own DatasetError."""


GPT2_VOCAB = 50257  # tiktoken's 'gpt2' encoding; a dataset without meta.pkl is in these tokens


def _rerun(dataset):
    if os.path.exists(os.path.join(DATA_DIR, dataset, 'prepare.py')):
        return f"rerun `python data/{dataset}/prepare.py`"
    return f"rerun whatever prepared data/{dataset} (it has no prepare.py)"


def load_meta(path, dataset):
    """meta.pkl's dict. A corrupt, truncated or empty file is a DatasetError that names it."""
    import pickle
    try:
        with open(path, 'rb') as f:
            meta = pickle.load(f)
    except Exception as e:  # garbage unpickles into any of a dozen exception types
        raise DatasetError(f"{path} is unreadable ({type(e).__name__}: {e}); {_rerun(dataset)}") from None
    if not isinstance(meta, dict) or 'vocab_size' not in meta:
        raise DatasetError(f"{path} holds no vocabulary (a dict with vocab_size); {_rerun(dataset)}")
    return meta


def _manifest(data_dir, dataset):
    """prepare.py's record of what it wrote ({'files': {name: {'bytes', 'sha256'}}, ...}), or None if absent."""
    path = os.path.join(data_dir, 'manifest.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        assert isinstance(manifest['files'], dict)
        return manifest
    except Exception as e:
        raise DatasetError(f"{path} is unreadable ({type(e).__name__}: {e}); {_rerun(dataset)}") from None


def _check_file(data_dir, dataset, name, record):
    """The file as prepare.py wrote it: same size, same sha256 (2 MB hash in ~10 ms: cheap enough every load)."""
    import hashlib
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise DatasetError(f"{path} is missing but manifest.json lists it; {_rerun(dataset)}")
    size = os.path.getsize(path)
    if size != record['bytes']:
        raise DatasetError(f"{path} has {size:,} bytes, manifest.json records {record['bytes']:,} (truncated or "
                           f"changed since prepare.py wrote it); {_rerun(dataset)}")
    with open(path, 'rb') as f:
        if hashlib.sha256(f.read()).hexdigest() != record['sha256']:
            raise DatasetError(f"{path} differs from what prepare.py wrote (sha256 mismatch with manifest.json); "
                               f"{_rerun(dataset)}")


def dataset_meta(dataset):
    """meta.pkl's dict, or None for a dataset without one (GPT-2 BPE). With a manifest, meta.pkl belongs to the
    dataset exactly when the manifest lists it, and is checked against it."""
    data_dir = os.path.join(DATA_DIR, dataset)
    path = os.path.join(data_dir, 'meta.pkl')
    manifest = _manifest(data_dir, dataset)
    if manifest is not None:
        if 'meta.pkl' not in manifest['files']:
            return None
        _check_file(data_dir, dataset, 'meta.pkl', manifest['files']['meta.pkl'])
    return load_meta(path, dataset) if os.path.exists(path) else None


def load_dataset(dataset, device):
    """The splits as int64 tensors on `device` (tiny-shakespeare is 1M tokens: 8 MB) and meta.pkl's dict (None
    for a dataset without one: GPT-2 BPE). The splits: 'train', 'val', and 'test' where the dataset has a
    test.bin (shakespeare_char and shakespeare: halves of the last 10%; a folder without one, such as nanoGPT's
    own, has train and val only). A folder counts as prepared when its manifest.json and every file it lists
    exist, and, for a dataset with a prepare.py, test.bin is among them; otherwise prepare.py runs (again: a
    folder from a prepare.py that wrote no manifest, or no test split, is prepared anew, so that what trains is
    checked). Every file must match the manifest (size and sha256): a truncated or changed file is a
    DatasetError that says to rerun prepare.py, never a silently smaller dataset."""
    data_dir = os.path.join(DATA_DIR, dataset)
    prep = os.path.join(data_dir, 'prepare.py')
    manifest = _manifest(data_dir, dataset) if os.path.isdir(data_dir) else None
    prepared = manifest is not None and all(os.path.exists(os.path.join(data_dir, f)) for f in manifest['files'])
    no_test = prepared and os.path.exists(prep) and 'test.bin' not in manifest['files']
    bins = [os.path.join(data_dir, f) for f in ('train.bin', 'val.bin')]
    if (not prepared or no_test) and os.path.exists(prep):
        import importlib.util
        spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', prep)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        unrecorded = manifest is None and all(map(os.path.exists, bins))
        print(f"{data_dir} has no manifest.json (prepared by an earlier prepare.py): preparing it again"
              if unrecorded else f"{data_dir} has no test split (prepared by an earlier prepare.py): preparing it "
              f"again" if no_test else f"preparing dataset {dataset!r} ...")
        try:
            mod.prepare(out_dir=data_dir)
        except getattr(mod, 'DatasetError', ()) as e:  # prepare.py's clear-message errors (offline, checksum)
            raise DatasetError(f"{data_dir} has no manifest.json to check its files against, and preparing it "
                               f"again failed: {e}" if unrecorded else str(e)) from None
        manifest = _manifest(data_dir, dataset)
    elif not prepared and not all(map(os.path.exists, bins)):
        have = sorted(d for d in os.listdir(DATA_DIR) if not d.startswith('_'))
        raise FileNotFoundError(f"dataset {dataset!r} not found in {data_dir} and has no prepare.py; "
                                f"available datasets: {', '.join(have)}")
    names = ['train.bin', 'val.bin']
    if manifest is None:  # a folder of .bin files without a prepare.py (e.g. nanoGPT's own): nothing to check with
        print(f"note: {data_dir} has no manifest.json; its files are not checked")
        names += ['test.bin'] if os.path.exists(os.path.join(data_dir, 'test.bin')) else []
    else:
        names += ['test.bin'] if 'test.bin' in manifest['files'] else []
        for name in names:
            if name not in manifest['files']:
                raise DatasetError(f"{data_dir}/manifest.json does not list {name}; {_rerun(dataset)}")
            _check_file(data_dir, dataset, name, manifest['files'][name])
    meta = dataset_meta(dataset)
    splits = {n[:-4]: torch.from_numpy(np.fromfile(os.path.join(data_dir, n), dtype=np.uint16).astype(np.int64)).to(device)
              for n in names}
    return splits, meta


def load_split(dataset, split, device='cpu'):
    """One split of a prepared dataset (data/<dataset>/<split>.bin) as an int64 tensor, checked against the
    manifest when it lists the file. A split that is not there is an error naming the splits present (never
    another split in its place)."""
    data_dir = os.path.join(DATA_DIR, dataset)
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        have = sorted(f[:-4] for f in os.listdir(data_dir) if f.endswith('.bin')) if os.path.isdir(data_dir) else []
        raise DatasetError(f"dataset {dataset!r} has no {split!r} split ({path} not found); splits present: "
                           + (', '.join(have) if have else f"none ({_rerun(dataset)})"))
    manifest = _manifest(data_dir, dataset)
    if manifest is not None and f'{split}.bin' in manifest['files']:
        _check_file(data_dir, dataset, f'{split}.bin', manifest['files'][f'{split}.bin'])
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64)).to(device)

def check_block_size(splits, block_size, dataset):
    """Every training and evaluation window is block_size + 1 consecutive tokens (the inputs, and the targets
    shifted by one), so a split of M tokens holds windows for block_size <= M - 1."""
    for split, d in splits.items():
        if len(d) < block_size + 1:
            raise ConfigError(f"block_size {block_size} exceeds the {len(d):,} tokens of {split} (data/{dataset}/"
                              f"{split}.bin): a window takes block_size + 1 tokens, so block_size can be at most "
                              f"{max(len(d) - 1, 0):,} here")


def codec(dataset, vocab_size):
    """(encode, decode) between text and a dataset's token ids: meta.pkl's characters, or GPT-2 BPE through
    tiktoken when the dataset has no meta.pkl (as nanoGPT's sample.py does). vocab_size is the model's."""
    meta = dataset_meta(dataset)
    if meta is None:
        if vocab_size < GPT2_VOCAB:
            raise DatasetError(f"data/{dataset} has no meta.pkl, and a model with vocab_size {vocab_size} is not "
                               f"GPT-2 BPE ({GPT2_VOCAB} tokens); {_rerun(dataset)}")
        import tiktoken
        enc = tiktoken.get_encoding('gpt2')

        def decode(ids):
            # ids of the padded vocabulary (50257..50303) are no GPT-2 token: a trained model never picks them,
            # an untrained one may, so they show as U+FFFD rather than fail
            b = b''.join(enc.decode_single_token_bytes(i) if i < enc.n_vocab else '\ufffd'.encode() for i in ids)
            return b.decode('utf-8', errors='replace')
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), decode
    stoi, itos = meta['stoi'], meta['itos']

    def encode(s):
        unknown = sorted(set(s) - set(stoi))
        if unknown:
            raise ConfigError(f"prompt has characters outside the vocabulary: {unknown!r}")
        return [stoi[c] for c in s]
    return encode, lambda ids: ''.join(itos[int(i)] for i in ids)


def atomic_torch_save(obj, path):
    """Write then rename: a process killed mid-save leaves the previous checkpoint intact."""
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Progress through `count` units of work, with an ETA from the rate so far (weights: a unit's relative
    cost, e.g. its tokens). text() is "k/n, elapsed, eta" for the lines a caller prints anyway. bar=True shows
    progress of a phase that prints nothing else (an evaluation): a tqdm bar on a terminal; elsewhere (a log
    file, a pipe) a plain line every `every` seconds, so a log gets lines, not carriage returns, and a short
    phase stays silent."""

    def __init__(self, count, desc='', weights=None, bar=False, every=30.0):
        self.count, self.desc, self.every = count, desc, every
        self.total = float(sum(weights)) if weights else float(count)
        self.n, self.done, self.t0 = 0, 0.0, time.time()
        self.last, self.bar = self.t0, None
        self.plain = bar and not sys.stderr.isatty()
        if bar and not self.plain:
            from tqdm import tqdm
            self.bar = tqdm(total=count, desc=desc, leave=False, delay=2.0, file=sys.stderr)

    def update(self, weight=1.0):
        self.n, self.done = self.n + 1, self.done + weight
        if self.bar is not None:
            self.bar.update(1)
        elif self.plain and time.time() - self.last >= self.every and self.n < self.count:
            self.last = time.time()
            print(f"{self.desc}: {self.text()}", flush=True)

    def skip(self, weight=1.0):
        """A unit that cost (next to) nothing: counted, and its weight taken out of the work left."""
        self.total -= weight
        self.update(0.0)

    def eta(self):
        return (time.time() - self.t0) * (self.total - self.done) / self.done if self.done else None

    def text(self):
        eta = self.eta()
        return (f"{self.n}/{self.count}, {fmt_time(time.time() - self.t0)} elapsed"
                + (f", eta {fmt_time(eta)}" if eta is not None else ''))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse instead of handing large blocks back to the kernel. By
    default a block over its dynamic threshold is mmapped and unmapped on free, and the heap's top is trimmed,
    so a CPU step that allocates the same large temporaries every iteration pays page faults for them again
    each time: the CPU references' (B, H, T, T) and (B, H, N, C, C) tensors. Blocks up to 32 MiB (glibc's
    largest mmap threshold on 64-bit) then come from the heap, which is trimmed only past 1 GiB free. On the
    2-core machine a process of 46 NSA CPU-preset steps (tools/cpu_step_profile.py) spent 0.39 instead of 1.17 s of
    system time and 0.872x the wall time (results/cpu-reproduction/step-profile/). Linux with glibc only: True if
    both were set."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def execution_modes(gpt_cls, device_type, compile='auto', cuda_graphs='auto', ddp=False):
    """(use torch.compile, use CUDA graphs) for a model class on a device type, 'auto' = on for CUDA.
    Off, with the reason printed, where they can't work: compile for a model that declares a
    compile_problem, graphs under DDP. cuda_graphs=True without CUDA is an error. train() and bench's
    timings both decide here."""
    check_value('compile', compile, None, TRISTATE)  # bool('no') would be True
    check_value('cuda_graphs', cuda_graphs, None, TRISTATE)
    use_compile = (device_type == 'cuda') if compile == 'auto' else bool(compile)
    if use_compile and getattr(gpt_cls, 'compile_problem', None):
        print(f"torch.compile: off for {gpt_cls.__module__}: {gpt_cls.compile_problem}; running eagerly")
        use_compile = False
    use_graphs = (device_type == 'cuda' and not ddp) if cuda_graphs == 'auto' else bool(cuda_graphs)
    if use_graphs and device_type != 'cuda':
        raise ConfigError(f"cuda_graphs=True needs a CUDA device, got {device_type!r}; use cuda_graphs='auto' or False")
    if use_graphs and ddp:
        print("cuda_graphs: off under DDP (its gradient all-reduce hooks are not captured); running eagerly")
        use_graphs = False
    return use_compile, use_graphs


class GraphedStep:
    """One micro-step -- forward, loss / gas, backward into the existing .grad tensors -- captured once
    in a CUDA graph and replayed. Why: at this model size every mixer except vanilla is bound by the
    CPU, not the GPU (bench.py profile: DeltaNet's step keeps the H200 22% busy; fla's Triton kernels
    cost ~100 us of Python each to launch). A replay launches the whole step at once.

    The optimizer step, gradient clipping and zeroing stay outside the graph (a few fused launches),
    so learning-rate changes need no capturable optimizer. Gradients must exist before capture, so that
    backward is captured as an in-place accumulation (gas > 1 works) -- step() zeroes them each
    optimizer step. Dropout is graph-safe (PyTorch advances the Philox offset on each replay).
    Capture runs a few warm-up micro-steps on a side stream first (Triton autotuning, torch.compile),
    whose gradients are discarded and whose dropout draws are undone (the CUDA RNG state is restored,
    so a resumed run continues the same stream). An error in the warm-up (the model itself, or
    torch.compile) propagates as it is; one in the capture raises model.CaptureError, and the caller
    falls back to eager steps."""

    def __init__(self, model, params, autocast, X, Y, gas=1, warmup=3):
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.x, self.y = X.clone(), Y.clone()

        def micro_step():
            with autocast:
                loss = model(self.x, self.y)[1] / gas
            loss.backward()
            return loss

        # the warm-up steps' gradients are zeroed after each, so the captured one starts from zero
        self.graph, self.loss = model_lib.capture_cuda_graph(micro_step, warmup, after_warmup=self.zero_grad)
        self.zero_grad()

    def zero_grad(self):
        torch._foreach_zero_([p.grad for p in self.params])

    def __call__(self, X, Y):
        """One micro-step on batch (X, Y): returns the (static) scaled loss tensor of this replay."""
        self.x.copy_(X, non_blocking=True)
        self.y.copy_(Y, non_blocking=True)
        self.graph.replay()
        return self.loss


def as_list(x, cast=None):
    """'a,b' / (a, b) / [a, b] / a -> list (so CLI literals and Python calls look alike); None stays None."""
    if x is None:
        return None
    if isinstance(x, str):
        x = [s.strip() for s in x.split(',') if s.strip()]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    return [cast(v) for v in x] if cast else list(x)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def resolve_device(device):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device not in ('cpu', 'cuda') and not str(device).startswith('cuda:'):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device


def autocast_for(device):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU bf16 is slow and not what we measure)."""
    if torch.device(device).type == 'cuda':
        return torch.autocast(device_type='cuda', dtype=torch.bfloat16)
    return torch.autocast(device_type='cpu', enabled=False)


def act_dtype(device):
    return torch.bfloat16 if torch.device(device).type == 'cuda' else torch.float32


def failure_status(e):
    """The status of a measurement that raised: 'OOM' (expected at the memory wall: no traceback) or
    'error: <type>: <first line>' (traceback printed)."""
    if is_oom(e):
        return 'OOM'
    traceback.print_exc()
    return f'error: {type(e).__name__}: {model_lib.first_line(e, 200)}'


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower()


def free_memory(device):
    gc.collect()
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()


def fmt_cell(v):
    if v is None:
        return ''
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return '' if math.isnan(v) else f'{v:.6g}'
    return str(v)


def write_csv(path, rows, columns):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(columns)
        for r in rows:
            w.writerow([fmt_cell(r.get(c)) for c in columns])
    print(f"[bench] wrote {path} ({len(rows)} rows)")


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(jsonable(obj), f, indent=2, sort_keys=True)
        f.write('\n')


def write_meta(out, name, device, settings, **extra):
    """<out>/<name>.meta.json: how the file was made (command, commit, device, versions, settings)."""
    meta = dict(run_metadata())
    meta.update(name=name, device=device_name(device), device_type=torch.device(device).type,
                call=f"bench.{name}({', '.join(f'{k}={v!r}' for k, v in settings.items())})",
                settings=settings, **extra)
    write_json(os.path.join(out, f'{name}.meta.json'), meta)
    return meta


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ----------------------------------------------------------------------------------------------
# statistics over seeds: mean ± sample std, and Welch's 95% interval for a difference of means (no scipy)

def mean_std(xs):
    """Mean and sample std (n - 1; NaN for a single value)."""
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float('nan')
    return mean, std


def _betacf(a, b, x):
    """The continued fraction of the regularized incomplete beta function I_x(a, b), evaluated with the
    modified Lentz method: 1 / (1 + d1 / (1 + d2 / (1 + ...))), d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),
    d_{2m} = m (b-m) x / ((a+2m-1)(a+2m)). It converges fast for x < (a+1) / (a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 <= x <= 1, from
    x^a (1-x)^b / (a B(a, b)) times the continued fraction, using I_x(a, b) = 1 - I_{1-x}(b, a) on the side
    where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - lbeta)
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """Student's t distribution function: P(T <= t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0 (symmetric)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with t_cdf(t, df) = p (0 < p < 1; df > 0, not necessarily whole: Welch's), by bisection."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0; got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket it (df=1, p=0.999999 needs ~3e5)
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def welch(a, b, level=0.95):
    """Welch's interval for mean(a) - mean(b), samples of unequal variance: the difference d, the standard
    error se = sqrt(s_a^2/n_a + s_b^2/n_b), the Welch-Satterthwaite degrees of freedom
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)), and d ± t_{(1+level)/2, df} se. Significant
    when the interval excludes 0. Fewer than 2 values on either side: no interval (NaN, not significant)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d, nan = ma - mb, float('nan')
    if len(a) < 2 or len(b) < 2:
        return dict(diff=d, se=nan, df=nan, low=nan, high=nan, significant=False)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical values on both sides: any difference is exact
        return dict(diff=d, se=0.0, df=nan, low=d, high=d, significant=d != 0)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * se
    return dict(diff=d, se=se, df=df, low=d - half, high=d + half, significant=not d - half <= 0 <= d + half)
