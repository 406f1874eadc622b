"""
Benchmarks of the four token mixers, and the generated report.

    python bench.py <sub-command> [--key=value ...]

    params      parameter-matching table (layers, heads, widths, solved d_ff, total params, % vs vanilla)
    memory      peak training memory (fwd+bwd) vs context 256 -> 131072, batch 1 and 4; OOM wall;
                decoding-state bytes per sequence (KV cache vs recurrent state)
    latency     batch-1 generation: prefill time vs prompt length, per-token decode time with the
                cache/state, and vanilla's no-cache recompute path for comparison
    throughput  training ms/iter, tokens/s and MFU at the training shape and at long context
    bakeoff     tables + plots from the sweep's run records in results/runs/<preset>/ (deterministic)
    report      results/REPORT.md from whatever result files exist
    selfcheck   each model's fla-kernel-vs-reference check (CUDA); non-zero exit on any FAIL
    profile     where a training step's time goes: wall vs GPU kernel time, kernels/iter, top kernels
    scaling     DDP over N GPUs against one at the same global batch: tokens/s ratio and both loss curves
    all         params, memory, latency, throughput, bakeoff, report

Every sub-command is also a function: bench.params(out='results', tiny=False, device='auto', ...).
Common keys: --out=results (output folder), --tiny=True (each module's TINY config and small sizes,
for CPU tests), --device=auto|cpu|cuda, --models=vanilla,delta (default: every model in
model.MODEL_TYPES whose module imports). Values are Python literals: --contexts=256,512 --compile=True.

Each benchmark writes <out>/<name>.csv, a sidecar <out>/<name>.meta.json (command, git commit, device,
library versions, settings) and a PNG. The bake-off's files depend only on the run records they are
made from (no timestamp, no commit of *now*), so they are byte-for-byte reproducible.
"""

import csv
import gc
import inspect
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import fields, replace

import torch

import model
# train_runner imports bench only inside its sweep, so importing it here is no cycle
from train_runner import (_as_list, _parse_value, device_name, execution_modes, load_dataset, peak_flops,
                          run_metadata, train)

HERE = os.path.dirname(os.path.abspath(__file__))

# sizes of each benchmark: (full, tiny)
MEMORY_CONTEXTS = ([2 ** i for i in range(8, 18)], [32, 64])           # 256 -> 131072
MEMORY_BATCHES = ((1, 4), (1, 2))
LATENCY_CONTEXTS = ([2 ** i for i in range(7, 16)], [16, 32])          # 128 -> 32768
_DECODE_COL = {'compiled graph': 'decode_compiled_ms_per_token', 'graph': 'decode_graph_ms_per_token',
               'eager': 'decode_eager_ms_per_token'}                     # latency's decode modes
THROUGHPUT_SHAPES = ([(64, 256), (16, 1024), (4, 4096), (1, 16384)],  # (B, T): training shape, then 16384 tokens/step
                     [(4, 32), (1, 64)])


# ----------------------------------------------------------------------------- small utilities
def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def _resolve_device(device):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device not in ('cpu', 'cuda') and not str(device).startswith('cuda:'):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device


def _autocast(device):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU bf16 is slow and not what we measure)."""
    if torch.device(device).type == 'cuda':
        return torch.autocast(device_type='cuda', dtype=torch.bfloat16)
    return torch.autocast(device_type='cpu', enabled=False)


def _act_dtype(device):
    return torch.bfloat16 if torch.device(device).type == 'cuda' else torch.float32


def _failure(e):
    """The status of a measurement that raised: 'OOM' (expected at the memory wall: no traceback) or
    'error: <type>: <first line>' (traceback printed)."""
    if _is_oom(e):
        return 'OOM'
    traceback.print_exc()
    return f'error: {type(e).__name__}: {model.first_line(e, 200)}'


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower()


def _free(device):
    gc.collect()
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()


def available_models(models=None):
    """[(model_type, module)] for the requested model types (default: all of model.MODEL_TYPES),
    skipping, with a printed reason, those whose module does not import or lacks GPTConfig/GPT."""
    names = _as_list(models) or list(model.MODEL_TYPES)
    out = []
    for mt in names:
        if mt not in model.MODEL_TYPES:
            raise ValueError(f"unknown model_type {mt!r}; valid choices: {', '.join(model.MODEL_TYPES)}")
        try:
            mod = model.get_model_module(mt)
            missing = [a for a in ('GPTConfig', 'GPT') if not hasattr(mod, a)]
            if missing:
                raise ImportError(f"module {mod.__name__} has no {', '.join(missing)}")
        except Exception as e:
            print(f"[bench] skipping model {mt!r}: {type(e).__name__}: {e}")
            continue
        out.append((mt, mod))
    return out


def base_kwargs(mt, mod, tiny, model_kw=None):
    """The model's GPTConfig kwargs: model_kw[mt] when given (e.g. the sweep's configs, read from its run
    records), else {} (the module's defaults: the real ~10.7M model) or, with tiny, its TINY."""
    if model_kw and mt in model_kw:
        return dict(model_kw[mt])
    if not tiny:
        return {}
    return dict(mod.TINY)


def model_kwargs(mt, mod, tiny, model_kw=None):
    """GPTConfig kwargs of the benchmarked model (base_kwargs), with d_ff resolved at the *training*
    block_size. Benchmarks then change block_size (the context) but keep d_ff fixed: solving it again
    at block_size=131072 would match vanilla's giant position table."""
    kw = base_kwargs(mt, mod, tiny, model_kw)
    cfg = mod.GPTConfig(**{**kw, 'model_type': mt})
    if cfg.d_ff < 0:
        kw['d_ff'] = model.solve_d_ff(cfg, mod.GPT)
    return kw


def build(mt, kw, device, **overrides):
    """model.build_model on `device` ('meta': shapes only, nothing allocated)."""
    if device == 'meta':
        with torch.device('meta'):
            return model.build_model(mt, **{**kw, **overrides})
    return model.build_model(mt, **{**kw, **overrides}).to(device)


def _fmt(v):
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
            w.writerow([_fmt(r.get(c)) for c in columns])
    print(f"[bench] wrote {path} ({len(rows)} rows)")


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
        f.write('\n')


def write_meta(out, name, device, settings, **extra):
    """<out>/<name>.meta.json: how the file was made (command, commit, device, versions, settings)."""
    meta = dict(run_metadata())
    meta.update(name=name, device=device_name(device), device_type=torch.device(device).type,
                call=f"bench.{name}({', '.join(f'{k}={v!r}' for k, v in settings.items())})",
                settings=settings, **extra)
    write_json(os.path.join(out, f'{name}.meta.json'), meta)
    return meta


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _savefig(fig, path):
    # no 'Software' (matplotlib version) in the PNG: plots depend on their data only
    fig.savefig(path, dpi=110, metadata={'Software': None})
    _plt().close(fig)
    print(f"[bench] wrote {path}")


def _color(mt):
    order = list(model.MODEL_TYPES)
    return f'C{order.index(mt)}' if mt in order else 'C7'


# ----------------------------------------------------------------------------- params
def params(out='results', tiny=False, device='auto', models=None, model_kw=None):
    """Parameter-matching table: widths, solved d_ff, head dims, total / non-embedding params, % vs vanilla."""
    base_fields = {f.name for f in fields(model.GPTConfig)}
    rows, notes = [], []
    for mt, mod in available_models(models):
        kw = base_kwargs(mt, mod, tiny, model_kw)
        cfg = mod.GPTConfig(**{**kw, 'model_type': mt})
        asked = cfg.d_ff
        m = model.build_model(mt, **kw)  # on CPU: 10M params is cheap, and every init path runs as in training
        c = m.config
        mixer = m.transformer.h[0].mixer
        head_dims = ' '.join(f'{k}={v}' for k, v in sorted(vars(mixer).items())
                             if isinstance(v, int) and not isinstance(v, bool) and ('head' in k or 'dim' in k))
        mixer_cfg = ' '.join(f'{f.name}={getattr(c, f.name)}' for f in fields(c) if f.name not in base_fields)
        rows.append(dict(model=mt, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, d_ff=c.d_ff or 4 * c.n_embd,
                         d_ff_from={-1: 'solved', 0: '4*n_embd'}.get(asked, 'given'), block_size=c.block_size,
                         pos_emb=c.pos_emb, head_dims=head_dims, mixer_config=mixer_cfg,
                         total_params=m.get_num_params(non_embedding=False),
                         non_embedding_params=m.get_num_params(non_embedding=True)))
        if asked < 0:
            # the same arithmetic as model.solve_d_ff, spelled out
            vcfg = model.GPTConfig(n_layer=c.n_layer, n_embd=c.n_embd, vocab_size=c.vocab_size,
                                   block_size=c.block_size, bias=c.bias, n_head=1)
            target = model.count_params(vcfg, model.GPT)
            base_ff = 4 * c.n_embd
            here = model.count_params(replace(c, d_ff=base_ff), mod.GPT)
            per_unit = c.n_layer * (2 * c.n_embd + (1 if c.bias else 0))
            notes.append(f"{mt}: d_ff solved to {c.d_ff}: target = vanilla's total {target:,} params (same n_layer, "
                         f"n_embd, vocab_size, block_size, bias); with d_ff = 4*n_embd = {base_ff} this model has "
                         f"{here:,}; each unit of d_ff costs n_layer*2*n_embd = {per_unit:,} params, so d_ff = "
                         f"{base_ff} + ({target:,} - {here:,}) / {per_unit:,} = {base_ff + (target - here) / per_unit:.1f}"
                         f", rounded to a multiple of 8 -> {c.d_ff} (total {rows[-1]['total_params']:,}).")
        else:
            notes.append(f"{mt}: d_ff = {rows[-1]['d_ff']} ({rows[-1]['d_ff_from']}).")
        del m
    vanilla = next((r['total_params'] for r in rows if r['model'] == 'vanilla'), None)
    for r in rows:
        r['diff_vs_vanilla_pct'] = round(100 * (r['total_params'] - vanilla) / vanilla, 3) if vanilla else None
        print(f"[params] {r['model']:>14}: total {r['total_params']:>11,}  non-emb {r['non_embedding_params']:>11,}  "
              f"d_ff {r['d_ff']:>5}  {r['head_dims']}  diff {_fmt(r['diff_vs_vanilla_pct'])}%")
        if r['diff_vs_vanilla_pct'] is not None and abs(r['diff_vs_vanilla_pct']) > 1:
            print(f"[params] WARNING: {r['model']} is {r['diff_vs_vanilla_pct']:+.2f}% from vanilla's total params "
                  f"(d_ff cannot absorb the difference: check the mixer's widths)")
    print("[params] how d_ff was solved (model.solve_d_ff):")
    for n in notes:
        print("   ", n)
    cols = ['model', 'n_layer', 'n_head', 'n_embd', 'd_ff', 'd_ff_from', 'block_size', 'pos_emb', 'head_dims',
            'mixer_config', 'total_params', 'non_embedding_params', 'diff_vs_vanilla_pct']
    write_csv(os.path.join(out, 'params.csv'), rows, cols)
    write_meta(out, 'params', _resolve_device(device), dict(tiny=tiny, models=models, model_kw=model_kw),
               d_ff_solve=notes)
    return rows


# ----------------------------------------------------------------------------- memory
def measure_train_peak(m, B, T, device):
    """Run one fwd+bwd (bf16 autocast on CUDA) over a (B, T) batch; return the peak bytes allocated
    (parameters, gradients and activations), or None on CPU (no peak-memory counter there).
    Raises torch.cuda.OutOfMemoryError when it does not fit."""
    vocab = m.config.vocab_size
    idx = torch.randint(vocab, (B, T), device=device)
    targets = torch.randint(vocab, (B, T), device=device)
    assert idx.shape == (B, T), "the benchmark must feed exactly T tokens"
    cuda = torch.device(device).type == 'cuda'
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    with _autocast(device):
        logits, loss = m(idx, targets)
    assert logits.shape[:2] == (B, T), f"model returned {tuple(logits.shape)} logits for a ({B}, {T}) input"
    loss.backward()
    del logits, loss
    if not cuda:
        return None
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


def time_fwd_bwd(m, B, T, device, repeats):
    """Median wall time (ms) of `repeats` fwd+bwd passes over a (B, T) batch, synchronised around each."""
    vocab = m.config.vocab_size
    idx, targets = torch.randint(vocab, (B, T), device=device), torch.randint(vocab, (B, T), device=device)
    times = []
    for _ in range(repeats):
        m.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device):
            _, loss = m(idx, targets)
        loss.backward()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        del loss
    return _median(times)


def memory(out='results', tiny=False, device='auto', models=None, contexts=None, batches=None, warmup=True,
           model_kw=None, repeats=3):
    """Peak training memory vs context (powers of two) at batch 1 and 4, the OOM wall, and decoding-state
    bytes per sequence. Each model is built with block_size = T and fed exactly T tokens (no cropping).
    The same run times fwd+bwd (median of `repeats` passes after the measured one) and reports each
    model's time against vanilla's at the same (B, T): the long-context speed comparison."""
    device = _resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    contexts = _as_list(contexts, int) or MEMORY_CONTEXTS[tiny]
    batches = _as_list(batches, int) or list(MEMORY_BATCHES[tiny])
    if not cuda:
        print("[memory] peak memory is read from torch.cuda.max_memory_allocated, which CPU lacks: on CPU the "
              "fwd+bwd still runs at every context (a shape check) but peak_bytes stays empty; "
              "decoding-state bytes are computed as on CUDA")
    rows = []
    for mt, mod in available_models(models):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        state_bytes = {}
        for T in contexts:
            state_bytes[T] = build(mt, kw, 'meta', block_size=T).decode_state_bytes(1, T)
        for B in batches:
            wall = None  # first context that did not fit
            for T in contexts:
                row = dict(model=mt, batch=B, context=T, tokens=B * T, state_bytes=state_bytes[T])
                if wall is not None:
                    row['status'] = f'skipped (OOM at {wall})'
                    rows.append(row)
                    continue
                m = oom = None
                try:
                    m = build(mt, kw, device, block_size=T)
                    row['param_bytes'] = sum(p.numel() * p.element_size() for p in m.parameters())
                    if warmup and cuda:  # first call autotunes kernels (extra buffers); measure the second
                        measure_train_peak(m, B, T, device)
                        m.zero_grad(set_to_none=True)
                    peak = measure_train_peak(m, B, T, device)
                    row['status'] = 'ok' if peak is not None else 'ok (peak not measured on cpu)'
                    row['peak_bytes'] = peak
                    row['peak_gib'] = peak / 2 ** 30 if peak is not None else None
                    if repeats:
                        row['fwdbwd_ms'] = time_fwd_bwd(m, B, T, device, repeats)
                except Exception as e:
                    row['status'] = _failure(e)
                    oom = row['status'] == 'OOM'
                del m
                _free(device)  # outside the except block: the traceback no longer pins the tensors
                if oom:
                    wall = T
                rows.append(row)
                print(f"[memory] {mt} B={B} T={T}: {row['status']}"
                      + (f", peak {row['peak_gib']:.3f} GiB" if row.get('peak_gib') is not None else '')
                      + f", state {state_bytes[T]:,} B/seq", flush=True)
    _add_vs_vanilla(rows, 'fwdbwd_ms', 'fwdbwd_vs_vanilla')
    _print_vs_vanilla('memory', rows, 'fwdbwd_vs_vanilla', 'fwd+bwd time')
    cols = ['model', 'batch', 'context', 'tokens', 'status', 'peak_bytes', 'peak_gib', 'param_bytes', 'state_bytes',
            'fwdbwd_ms', 'fwdbwd_vs_vanilla']
    write_csv(os.path.join(out, 'memory.csv'), rows, cols)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    write_meta(out, 'memory', device, dict(tiny=tiny, models=models, contexts=contexts, batches=batches,
                                           warmup=warmup, model_kw=model_kw, repeats=repeats),
               device_total_bytes=total, state_dtype='bfloat16 (KV caches; recurrent states fp32 in the mixers)')
    plot_memory(rows, os.path.join(out, 'memory.png'), total)
    return rows


def plot_memory(rows, path, device_total_bytes=None):
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    measured = False
    for mt in dict.fromkeys(r['model'] for r in rows):
        for B, ls in zip(sorted({int(r['batch']) for r in rows if r['model'] == mt}), ['-', '--', ':', '-.']):
            rs = [r for r in rows if r['model'] == mt and int(r['batch']) == B]
            pts = [(int(r['context']), float(r['peak_bytes']) / 2 ** 30) for r in rs
                   if r['status'] == 'ok' and r.get('peak_bytes') not in (None, '')]
            if pts:
                measured = True
                ax1.plot(*zip(*pts), ls, marker='o', ms=3, color=_color(mt), label=f'{mt} B={B}')
            for r in rs:
                if r['status'] == 'OOM':
                    y = device_total_bytes / 2 ** 30 if device_total_bytes else (pts[-1][1] if pts else 1)
                    ax1.plot([int(r['context'])], [y], 'x', ms=10, mew=2, color=_color(mt))
                    ax1.annotate('OOM', (int(r['context']), y), textcoords='offset points', xytext=(4, 4),
                                 fontsize=7, color=_color(mt))
    if device_total_bytes:
        ax1.axhline(device_total_bytes / 2 ** 30, color='k', lw=0.8, ls=':', label='device memory')
    if not measured:
        ax1.text(0.5, 0.5, 'peak memory not measured\n(needs CUDA)', ha='center', va='center',
                 transform=ax1.transAxes)
    ax1.set(xscale='log', yscale='log' if measured else 'linear', xlabel='context length T (tokens)',
            ylabel='peak training memory (GiB)', title='memory wall: fwd+bwd peak (x = OOM)')
    ax1.set_xscale('log', base=2)
    if measured:
        ax1.legend(fontsize=7)
    for mt in dict.fromkeys(r['model'] for r in rows):
        pts = sorted({(int(r['context']), int(r['state_bytes'])) for r in rows if r['model'] == mt})
        ax2.plot(*zip(*pts), marker='o', ms=3, color=_color(mt), label=mt)
    ax2.set(xscale='log', yscale='log', xlabel='context length T (tokens)', ylabel='bytes per sequence',
            title='decoding state (KV cache vs recurrent state)')
    ax2.set_xscale('log', base=2)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)


# ----------------------------------------------------------------------------- latency
class _Timer:
    """Wall time of a region in ms: CUDA events on CUDA (they time the GPU work the region queued,
    and the synchronize at the end waits for it), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _time_decode_modes(row, modes, timer, notes):
    """Fill row with timer(mode) -> (prefill ms, decode ms/token) for each decode mode, its column in
    _DECODE_COL, and the fastest as decode_mode / decode_ms_per_token / prefill_ms. A graph mode whose
    step can't be captured (model.CaptureError: a failed compilation, an op a graph can't hold, or out of
    memory while capturing, where eager steps may still fit) is skipped with a line in notes, as
    generate() falls back; any other error propagates (out of memory then becomes the row's status)."""
    for mode in modes:
        try:
            p, row[_DECODE_COL[mode]] = timer(mode)
        except model.CaptureError as e:
            notes.append(f"{mode} failed: {model.first_line(e, 150)}")
            continue
        if row[_DECODE_COL[mode]] < row.get('decode_ms_per_token', float('inf')):
            row.update(decode_mode=mode, prefill_ms=p, decode_ms_per_token=row[_DECODE_COL[mode]])


@torch.no_grad()
def time_generation(m, L, n, trials, device, cached=True, graph=False, compile=False):
    """Batch-1 greedy generation after a random prompt of L tokens: (prefill ms, decode ms per token),
    each the median over `trials` (after one untimed warm-up trial).
    cached: prefill the prompt into a state of capacity L+n, then n steps of
    model(next_token, state=state, last_only=True); with graph=True, n replays of that step captured
    once in a CUDA graph (model.GraphedDecodeStep, what generate() uses on CUDA; the capture happens
    in the warm-up trial), and with compile=True as well, of the step compiled by torch.compile
    (generate(compile=True); compiled in the warm-up trial too). Not cached: every new token runs a
    full forward over the whole sequence so far (prefill ms is then None)."""
    vocab = m.config.vocab_size
    prompt = torch.randint(vocab, (1, L), device=device)
    assert prompt.shape[1] == L
    state = m.init_state(1, L + n, dtype=_act_dtype(device)) if cached else None
    step = lambda tok: m(tok, state=state, last_only=True)[0]  # noqa: E731
    prefill, decode = [], []
    for trial in range(trials + 1):
        _sync(device)
        if cached:
            state.reset()  # untimed: zero the buffers, pos = 0
            with _autocast(device), _Timer(device) as tp:
                logits, _ = m(prompt, state=state, last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if graph and trial == 0:
                with _autocast(device):
                    step = model.GraphedDecodeStep(m, state, compile=compile)
            with _autocast(device), _Timer(device) as td:
                for _ in range(n):
                    logits = step(nxt)
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
            assert state.pos == L + n
        else:
            idx = prompt
            with _autocast(device), _Timer(device) as td:
                for _ in range(n):
                    logits, _ = m(idx, last_only=True)
                    idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            assert idx.shape[1] == L + n
        if trial > 0:  # trial 0 is the warm-up
            prefill.append(tp.ms if cached else None)
            decode.append(td.ms / n)
    return (_median(prefill) if cached else None), _median(decode)


def latency(out='results', tiny=False, device='auto', models=None, contexts=None, n_decode=None, trials=None,
            nocache=True, cuda_graph='auto', compile_decode=True, model_kw=None):
    """Batch-1 prefill time vs prompt length and per-token decode time at those contexts (cache/state),
    plus vanilla's no-cache recompute path in the same run, reported as a ratio.
    Decode modes, each timed in the same run where it applies: 'compiled graph' (the step under
    torch.compile, replayed from a CUDA graph: generate(compile=True)), 'graph' (the eager step replayed
    from a CUDA graph: generate()'s default on CUDA) and 'eager' (one kernel launch at a time). The
    headline decode_ms_per_token is the fastest of them (decode_mode says which).
    cuda_graph: 'auto' = the graph modes on CUDA for models with static steps; False = eager only.
    compile_decode: also time the compiled graph (compilation happens in the untimed warm-up)."""
    if cuda_graph not in ('auto', False):
        raise ValueError(f"cuda_graph must be 'auto' or False, got {cuda_graph!r}")
    device = _resolve_device(device)
    contexts = _as_list(contexts, int) or LATENCY_CONTEXTS[tiny]
    n = n_decode or (4 if tiny else 32)
    trials = trials or (2 if tiny else 5)
    rows = []
    for mt, mod in available_models(models):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        # one model for all contexts; its block_size covers the longest context plus the decoded tokens
        m = build(mt, kw, device, block_size=max(contexts) + n).eval()
        graphs = cuda_graph == 'auto' and torch.device(device).type == 'cuda' and m.static_decode
        modes = (['compiled graph'] if graphs and compile_decode else []) + (['graph'] if graphs else []) + ['eager']
        for L in contexts:
            row, notes, err = dict(model=mt, context=L, n_decode=n, trials=trials), [], None
            try:
                _time_decode_modes(row, modes, lambda mode, m=m, L=L: time_generation(
                    m, L, n, trials, device, graph=mode != 'eager', compile=mode == 'compiled graph'), notes)
                for note in notes:
                    print(f"[latency] {mt} L={L}: {note}", flush=True)
                row['decode_tokens_per_s'] = 1e3 / row['decode_ms_per_token']
                if nocache and mt == 'vanilla':
                    _, row['nocache_ms_per_token'] = time_generation(m, L, n, trials, device, cached=False)
                    # against the eager cached steps: the ratio is what the cache saves, not the graph too
                    row['nocache_over_cache'] = row['nocache_ms_per_token'] / row['decode_eager_ms_per_token']
                row['status'] = 'ok'
            except Exception as e:
                err = _failure(e)
            if err:
                row['status'] = err
                _free(device)
            row['note'] = '; '.join(notes)
            rows.append(row)
            times = ', '.join(f"{md} {row[_DECODE_COL[md]]:.3f}" for md in modes if row.get(_DECODE_COL[md]))
            print(f"[latency] {mt} L={L}: " + (f"prefill {row['prefill_ms']:.3f} ms, decode ms/token: {times}"
                  if row['status'] == 'ok' else row['status'])
                  + (f", no-cache {row['nocache_ms_per_token']:.3f} ms/token "
                     f"({row['nocache_over_cache']:.1f}x eager cached)" if 'nocache_ms_per_token' in row else ''),
                  flush=True)
        del m
        _free(device)
    cols = ['model', 'context', 'status', 'prefill_ms', 'decode_ms_per_token', 'decode_tokens_per_s', 'decode_mode',
            *_DECODE_COL.values(), 'nocache_ms_per_token', 'nocache_over_cache', 'n_decode', 'trials', 'note']
    write_csv(os.path.join(out, 'latency.csv'), rows, cols)
    write_meta(out, 'latency', device, dict(tiny=tiny, models=models, contexts=contexts, n_decode=n, trials=trials,
                                            nocache=nocache, cuda_graph=cuda_graph, compile_decode=compile_decode,
                                            model_kw=model_kw),
               method=f"batch 1, greedy; prefill = one forward of the L-token prompt into a fresh state of capacity "
                      f"L+n; decode = n={n} one-token steps with the state, ms/token, in each decode mode that "
                      f"applies (compiled graph: torch.compile'd step replayed from a CUDA graph; graph: the eager "
                      f"step replayed from a CUDA graph; eager: launched op by op), decode_mode = the fastest; "
                      f"no-cache = full forward over the whole sequence per token (vanilla); medians of "
                      f"{trials} trials after one warm-up trial (compilation and capture happen in it); "
                      f"{'CUDA events, bf16 autocast' if 'cuda' in device else 'perf_counter, fp32'}")
    plot_latency(rows, os.path.join(out, 'latency.png'))
    return rows


def _add_vs_vanilla(rows, value, col):
    """r[col] = r[value] / vanilla's r[value] at the same batch and context, for rows of one command (one
    run: the ratios the speed targets are stated in). Rows read back from a CSV work too (strings)."""
    key = lambda r: (str(r['batch']), str(r['context']))
    ref = {key(r): _num(r, value) for r in rows if r['model'] == 'vanilla' and _num(r, value)}
    for r in rows:
        if _num(r, value) and key(r) in ref:
            r[col] = _num(r, value) / ref[key(r)]
    return rows


def _print_vs_vanilla(tag, rows, col, what):
    """One line per (batch, context): every model's ratio to vanilla, as the targets state them."""
    shapes = {}
    for r in rows:
        if r.get(col):
            shapes.setdefault((r['batch'], r['context']), []).append(f"{r['model']} {r[col]:.2f}x")
    for (B, T), cells in shapes.items():
        print(f"[{tag}] {what} over vanilla's, B={B} T={T}: {', '.join(cells)}", flush=True)


def _decode_mode(r):
    """A latency.csv row's decode mode; rows written before decode_mode existed say decode_cuda_graph."""
    return r.get('decode_mode') or ('graph' if r.get('decode_cuda_graph') in (True, 'True') else 'eager')


def _num(r, k):
    v = r.get(k)
    return None if v in (None, '') else float(v)


def plot_latency(rows, path):
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw=dict(width_ratios=[1, 1.25]))
    for mt in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == mt and r['status'] == 'ok']
        if not rs:
            continue
        L = [int(r['context']) for r in rs]
        ax1.plot(L, [_num(r, 'prefill_ms') for r in rs], marker='o', ms=3, color=_color(mt), label=mt)
        modes = {_decode_mode(r) for r in rs}
        ax2.plot(L, [_num(r, 'decode_ms_per_token') for r in rs], marker='o', ms=3, color=_color(mt),
                 label=f"{mt} (cache/state, {modes.pop() if len(modes) == 1 else 'fastest mode'})")
        for col, style, what in (('decode_graph_ms_per_token', '-.', 'graph of the eager step'),
                                 ('decode_eager_ms_per_token', ':', 'eager steps')):
            pts = [(int(r['context']), _num(r, col)) for r in rs if _num(r, col) is not None
                   and _num(r, col) != _num(r, 'decode_ms_per_token')]
            if pts:
                ax2.plot(*zip(*pts), style, marker='.', ms=3, color=_color(mt), label=f'{mt} ({what})')
        nc = [(int(r['context']), _num(r, 'nocache_ms_per_token')) for r in rs
              if _num(r, 'nocache_ms_per_token') is not None]
        if nc:
            ax2.plot(*zip(*nc), '--', marker='x', ms=4, color=_color(mt), label=f'{mt} (no cache: recompute)')
    ax1.set(xscale='log', yscale='log', xlabel='prompt length (tokens)', ylabel='prefill time (ms)',
            title='prefill, batch 1')
    ax2.set(xscale='log', yscale='log', xlabel='context length (tokens)', ylabel='ms per generated token',
            title='decode, batch 1')
    for ax in (ax1, ax2):
        ax.set_xscale('log', base=2)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))  # outside: a dozen series
    fig.tight_layout()
    _savefig(fig, path)


# ----------------------------------------------------------------------------- throughput
def train_step_times(m, B, T, device, iters, warmup, compile=False, reuse=False, cuda_graphs=False):
    """ms of each of `iters` training iterations (fwd+bwd in bf16 autocast on CUDA, grad clip 1.0,
    AdamW step, like train_runner), after `warmup` untimed ones. compile / cuda_graphs: as in
    train_runner (a CUDA graph of forward+backward, train_runner.GraphedStep). reuse: the optimizer,
    compiled module and graph of the previous call on m (no re-compilation, no re-capture)."""
    from train_runner import GraphedStep
    vocab = m.config.vocab_size
    X = torch.randint(vocab, (B, T), device=device)
    Y = torch.randint(vocab, (B, T), device=device)
    if not (reuse and hasattr(m, '_bench_step')):
        opt = m.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(device).type)
        fwd = torch.compile(m) if compile else m
        graphed = None
        if cuda_graphs:
            try:
                graphed = GraphedStep(fwd, m.parameters(), _autocast(device), X, Y)
            except model.CaptureError as e:  # as train_runner does: eager steps, said so (the row records it)
                print(f"[bench] CUDA graph capture failed for {m.config.model_type} ({e}); timing eager steps")
                opt.zero_grad(set_to_none=True)
        m._bench_step = (opt, fwd, graphed)
    opt, fwd, graphed = m._bench_step
    times = []
    for i in range(warmup + iters):
        with _Timer(device) as t:
            if graphed is not None:
                graphed(X, Y)
            else:
                with _autocast(device):
                    _, loss = fwd(X, Y)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if graphed is not None:
                graphed.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(t.ms)
    return times


PROFILE_MODES = {'eager': (False, False), 'compiled': (True, False), 'train': ('auto', 'auto'),
                 'decode': None, 'decode_compiled': None}  # decode: batch-1 one-token steps, as generate() runs them


def _decode_runner(m, L, n, device, compile=False):
    """run() -> n one-token decoding steps after an L-token prompt, batch 1, as generate() runs them on this
    device: on CUDA replays of GraphedDecodeStep (compile=True: of the torch.compile'd step), on CPU eager
    steps. Each run() restarts at position L, so the state (capacity L + n) never fills."""
    cuda = torch.device(device).type == 'cuda'
    if compile and not cuda:
        raise ValueError("profile mode 'decode_compiled' needs CUDA: the compiled step is captured in a CUDA graph")
    state = m.init_state(1, L + n, dtype=_act_dtype(device))
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad(), _autocast(device):
        m(torch.randint(m.config.vocab_size, (1, L), device=device), state=state)  # prefill
        step = model.GraphedDecodeStep(m, state, compile=compile) if cuda else \
            (lambda t: m(t, state=state, last_only=True)[0])

    @torch.no_grad()
    def run():
        state.pos = L
        with _autocast(device):
            for _ in range(n):
                step(tok)
    return run


def profile(out='results', tiny=False, device='auto', models=None, batch=None, context=None, steps=None,
            modes=('eager', 'compiled', 'train'), model_kw=None, top=20):
    """Where a training step's time goes, per model: wall ms/iter against the GPU's kernel time per
    iteration (their gap is launch overhead, Python and synchronisation), the number of kernels a step
    launches, and the kernels that take the most time (torch.profiler). modes: 'eager', 'compiled'
    (torch.compile), 'train' (what train_runner does by default: compile + a CUDA graph of fwd+bwd), and
    for decoding, where an "iter" is one generated token at batch 1 after a prompt of `context` tokens
    (default 1024): 'decode' (the step as generate() runs it: a CUDA-graph replay on CUDA, eager on CPU)
    and 'decode_compiled' (the torch.compile'd step in a CUDA graph: generate(compile=True); CUDA only).
    Writes <out>/profile.csv and <out>/profile_<model>_<mode>.txt (the kernel tables)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device = _resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    B, T = (batch or (4 if tiny else 64)), (context or (32 if tiny else 256))
    steps = steps or (2 if tiny else 10)
    modes = _as_list(modes)
    bad = [md for md in modes if md not in PROFILE_MODES]
    if bad:
        raise ValueError(f"unknown profile mode(s) {bad}; valid: {', '.join(PROFILE_MODES)}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    os.makedirs(out, exist_ok=True)
    for mt, mod in available_models(models):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        for tag in modes:
            decode = tag.startswith('decode')
            b, t = (1, context or (32 if tiny else 1024)) if decode else (B, T)
            row = dict(model=mt, batch=b, context=t, mode=tag)
            m = prof = run = None
            try:
                if decode:
                    m = build(mt, kw, device, block_size=t + steps).eval()
                    row.update(compile=tag == 'decode_compiled', cuda_graphs=cuda)
                    run = _decode_runner(m, t, steps, device, compile=row['compile'])
                    run()  # warm-up: capture (and compilation) happen when the runner is built, this settles it
                    times = []
                    for _ in range(5):  # timed without the profiler; one "iter" is one token
                        with _Timer(device) as tm:
                            run()
                        times.append(tm.ms / steps)
                else:
                    m = build(mt, kw, device, block_size=T)
                    comp, graphs = execution_modes(type(m), torch.device(device).type, *PROFILE_MODES[tag])
                    row.update(compile=comp, cuda_graphs=graphs)
                    # timed without the profiler (its own overhead would inflate the wall time) ...
                    times = train_step_times(m, B, T, device, steps, 10 if comp else 5, comp, cuda_graphs=graphs)
                    row['cuda_graphs'] = m._bench_step[2] is not None  # as it ran
                # ... then the same steps again under it, for the kernel breakdown
                with torch_profile(activities=acts) as prof:
                    run() if decode else train_step_times(m, B, T, device, steps, 0, comp, reuse=True)
                kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                per_name = {}
                for e in kern:
                    d = per_name.setdefault(e.name, [0.0, 0])
                    d[0] += e.time_range.elapsed_us()
                    d[1] += 1
                gpu_ms = sum(d[0] for d in per_name.values()) / 1e3 / steps
                wall = _median(times)
                row.update(status='ok', ms_per_iter=wall, gpu_kernel_ms_per_iter=gpu_ms if cuda else None,
                           gpu_busy_pct=100 * gpu_ms / wall if cuda else None,
                           kernels_per_iter=len(kern) / steps if cuda else None)
                u = 'token' if decode else 'iter'
                lines = [f"{mt} ({tag}), B={b} T={t}: wall {wall:.3f} ms/{u} (median "
                         f"of {len(times) if decode else steps}{f' runs of {steps} tokens' if decode else ''}), "
                         + (f"GPU kernels {gpu_ms:.3f} ms/{u} ({row['gpu_busy_pct']:.0f}% busy), "
                            f"{row['kernels_per_iter']:.0f} kernels/{u}" if cuda else 'no CUDA'),
                         "", f"{'kernel':<90} {'ms/' + u:>9} {'calls/' + u:>11} {'% gpu':>6}"]
                for name, (us, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]:
                    lines.append(f"{name[:90]:<90} {us / 1e3 / steps:9.3f} {n / steps:11.1f} "
                                 f"{100 * us / 1e3 / steps / max(gpu_ms, 1e-9):6.1f}")
                lines += ["", "CPU-side operators (self CPU time, all steps):",
                          prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=top)]
                with open(os.path.join(out, f'profile_{mt}_{tag}.txt'), 'w') as f:
                    f.write('\n'.join(lines) + '\n')
                print('[profile] ' + lines[0], flush=True)
            except Exception as e:
                row['status'] = _failure(e)
                print(f"[profile] {mt} ({tag}): {row['status']}", flush=True)
            m = prof = run = None  # drop the model, its optimizer, compiled module and graph before the next one
            _free(device)
            rows.append(row)
    write_csv(os.path.join(out, 'profile.csv'), rows, ['model', 'batch', 'context', 'mode', 'compile', 'cuda_graphs',
                                                       'status', 'ms_per_iter',
                                                       'gpu_kernel_ms_per_iter', 'gpu_busy_pct', 'kernels_per_iter'])
    write_meta(out, 'profile', device, dict(tiny=tiny, models=models, batch=B, context=T, steps=steps,
                                            modes=modes, model_kw=model_kw),
               method="training modes: wall = median ms/iter of train_step_times (fwd+bwd, clip, AdamW) without the "
                      "profiler; decode modes: an iter is one generated token (batch 1, the context column is the "
                      "prompt length), wall = median over 5 runs of `steps` tokens; GPU kernel ms = sum of CUDA "
                      "kernel durations under torch.profiler / iters")
    return rows


def throughput(out='results', tiny=False, device='auto', models=None, shapes=None, iters=None, warmup=None,
               compile='auto', cuda_graphs='auto', model_kw=None):
    """Training ms/iter, tokens/s and MFU per model at the training shape (B 64 x T 256) and at long
    context with 16384 tokens a step (T = 1024, 4096, 16384)."""
    device = _resolve_device(device)
    if shapes is None:
        shapes = THROUGHPUT_SHAPES[tiny]
    shapes = [tuple(int(v) for v in s) for s in shapes]
    iters = iters or (2 if tiny else 20)
    warmup = warmup or (1 if tiny else (10 if compile else 5))
    peak = peak_flops(device)
    print(f"[throughput] peak FLOP/s for MFU on {device_name(device)}: "
          + (f"{peak:.4g}" if peak else "unknown (MFU left empty)"))
    rows = []
    for mt, mod in available_models(models):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        for B, T in shapes:
            row = dict(model=mt, batch=B, context=T, tokens_per_iter=B * T)
            m, err = None, None
            try:
                m = build(mt, kw, device, block_size=T)
                comp, graphs = execution_modes(type(m), torch.device(device).type, compile, cuda_graphs)
                row.update(compile=comp, cuda_graphs=graphs)
                times = train_step_times(m, B, T, device, iters, warmup, comp, cuda_graphs=graphs)
                row['cuda_graphs'] = m._bench_step[2] is not None  # as it ran
                dt = _median(times) / 1e3
                row.update(status='ok', ms_per_iter=dt * 1e3, tokens_per_s=B * T / dt,
                           mfu=m.estimate_mfu(B, dt, peak, T=T) if peak else None,
                           flops_per_token=m.flops_per_token(T))
            except Exception as e:
                err = _failure(e)
            if err:
                row['status'] = err
            del m
            _free(device)
            rows.append(row)
            print(f"[throughput] {mt} B={B} T={T}: " + (f"{row['ms_per_iter']:.2f} ms/iter, "
                  f"{row['tokens_per_s']:,.0f} tok/s" + (f", MFU {100 * row['mfu']:.1f}%" if row['mfu'] else '')
                  if row['status'] == 'ok' else row['status']), flush=True)
    _add_vs_vanilla(rows, 'ms_per_iter', 'vs_vanilla')
    _print_vs_vanilla('throughput', rows, 'vs_vanilla', 'ms/iter')
    cols = ['model', 'batch', 'context', 'tokens_per_iter', 'status', 'ms_per_iter', 'vs_vanilla', 'tokens_per_s',
            'mfu', 'flops_per_token', 'compile', 'cuda_graphs']
    write_csv(os.path.join(out, 'throughput.csv'), rows, cols)
    write_meta(out, 'throughput', device, dict(tiny=tiny, models=models, shapes=shapes, iters=iters, warmup=warmup,
                                               compile=compile, cuda_graphs=cuda_graphs, model_kw=model_kw),
               peak_flops=peak, method=f"median ms of {iters} iterations after {warmup} warm-up ones; an iteration "
                                       f"= fwd+bwd ({'bf16 autocast' if 'cuda' in device else 'fp32'}), grad clip "
                                       f"1.0, AdamW step; MFU = model.estimate_mfu(B, dt, peak_flops, T)")
    plot_throughput(rows, os.path.join(out, 'throughput.png'))
    return rows


def plot_throughput(rows, path):
    plt = _plt()
    shapes = list(dict.fromkeys((int(r['batch']), int(r['context'])) for r in rows))
    mts = list(dict.fromkeys(r['model'] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / max(1, len(mts))
    for i, mt in enumerate(mts):
        tps, mfu = [], []
        for B, T in shapes:
            r = next((r for r in rows if r['model'] == mt and (int(r['batch']), int(r['context'])) == (B, T)
                      and r['status'] == 'ok'), None)
            tps.append(_num(r, 'tokens_per_s') if r else 0)
            mfu.append(100 * _num(r, 'mfu') if r and _num(r, 'mfu') is not None else 0)
        x = [j + i * w for j in range(len(shapes))]
        ax1.bar(x, tps, w, color=_color(mt), label=mt)
        ax2.bar(x, mfu, w, color=_color(mt), label=mt)
    if not any(_num(r, 'mfu') for r in rows if r['status'] == 'ok'):
        ax2.text(0.5, 0.5, 'MFU not available\n(no peak FLOP/s known for this device)', ha='center',
                 va='center', transform=ax2.transAxes)
    labels = [f'B={B}\nT={T}' for B, T in shapes]
    for ax, yl in ((ax1, 'training tokens / s'), (ax2, 'MFU (%)')):
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], labels)
        ax.set(ylabel=yl)
        ax.legend(fontsize=7)
    ax1.set_title('training throughput (missing bar = OOM / error)')
    ax2.set_title('model FLOPs utilisation')
    fig.tight_layout()
    _savefig(fig, path)


# ----------------------------------------------------------------------------- bake-off
def _model_order(mt):
    order = list(model.MODEL_TYPES)
    return (order.index(mt) if mt in order else len(order), mt)


def _mean_std(xs):
    """Mean and sample std (n-1; NaN for a single value)."""
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float('nan')
    return mean, std


def _f(x, spec):
    """Fixed float formatting for the deterministic tables ('-' for missing / NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '-'
    return format(x, spec)


def load_runs(runs_dir):
    """Finished runs under runs_dir/<run_name>/ (summary.json with status 'done'), sorted by
    (model, lr, seed); and the names of the run folders that were skipped, with why."""
    runs, skipped = [], []
    for name in sorted(os.listdir(runs_dir)):
        d = os.path.join(runs_dir, name)
        if not os.path.isdir(d):
            continue
        try:
            with open(os.path.join(d, 'summary.json')) as f:
                summary = json.load(f)
            if summary.get('status') != 'done':
                raise ValueError(f"status {summary.get('status')!r}")
            with open(os.path.join(d, 'config.json')) as f:
                config = json.load(f)
            evals, trains = [], []
            if os.path.exists(os.path.join(d, 'metrics.jsonl')):
                with open(os.path.join(d, 'metrics.jsonl')) as f:
                    for line in f:
                        if line.strip():
                            rec = json.loads(line)
                            (evals if rec.get('kind') == 'eval' else trains).append(rec)
        except FileNotFoundError as e:  # unfinished (or still running): no path in the message, for reproducibility
            skipped.append(f'{name}: no {os.path.basename(e.filename)}')
            continue
        except Exception as e:
            skipped.append(f'{name}: {type(e).__name__}: {e}')
            continue
        runs.append(dict(name=name, summary=summary, config=config, evals=sorted(evals, key=lambda r: r['iter'])))
    runs.sort(key=lambda r: (_model_order(r['summary']['model_type']), float(r['summary']['learning_rate']),
                             int(r['summary']['seed']), r['name']))
    return runs, skipped


def _is_run_dir(d):
    return os.path.exists(os.path.join(d, 'summary.json')) or os.path.exists(os.path.join(d, 'config.json'))


def _resolve_runs_dir(out, preset, runs_dir):
    """The folder that holds the run folders: runs_dir if given; else <out>/runs when it holds runs
    directly (train_runner's sweep layout <results_dir>/runs/<run>), else <out>/runs/<preset>."""
    if runs_dir is not None:
        if not os.path.isdir(runs_dir):
            raise ValueError(f"bakeoff: runs_dir {runs_dir!r} is not a folder")
        return runs_dir, preset or os.path.basename(os.path.normpath(runs_dir))
    root = os.path.join(out, 'runs')
    if os.path.isdir(root) and any(_is_run_dir(os.path.join(root, d)) for d in os.listdir(root)):
        return root, preset or os.path.basename(os.path.normpath(out))
    presets = sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p))) \
        if os.path.isdir(root) else []
    if preset is None:
        if len(presets) != 1:
            raise ValueError(f"bakeoff: pass --preset=<name>; presets under {root}: {presets or 'none'}")
        preset = presets[0]
    elif preset not in presets:
        raise ValueError(f"bakeoff: no preset {preset!r} under {root}; valid choices: {presets or 'none'}")
    return os.path.join(root, preset), preset


def _oom_thresholds(out):
    """{model: {batch: 'first OOM context' | '>max measured'}} from <out>/memory.csv, if it was measured."""
    path = os.path.join(out, 'memory.csv')
    if not os.path.exists(path):
        return {}
    res = {}
    for r in read_csv(path):
        s = res.setdefault(r['model'], {}).setdefault(int(r['batch']), {'oom': None, 'max_ok': None, 'err': None})
        T = int(r['context'])
        if r['status'] == 'OOM' and (s['oom'] is None or T < s['oom']):
            s['oom'] = T
        if r['status'] == 'ok' and (s['max_ok'] is None or T > s['max_ok']):
            s['max_ok'] = T
        if r['status'].startswith('error') and (s['err'] is None or T < s['err']):
            s['err'] = T  # a failure that is not an OOM must not read as "no OOM up to max_ok"

    def summary(s):
        if s['err'] is not None and (s['oom'] is None or s['err'] < s['oom']):
            return f"err@{s['err']}"
        return str(s['oom']) if s['oom'] else (f">{s['max_ok']}" if s['max_ok'] else '-')
    return {mt: {B: summary(s) for B, s in bs.items()} for mt, bs in res.items()}


def _decode_ms(out, context=1024):
    path = os.path.join(out, 'latency.csv')
    if not os.path.exists(path):
        return {}
    return {r['model']: (float(r['decode_ms_per_token']), _decode_mode(r))
            for r in read_csv(path) if int(r['context']) == context and r['status'] == 'ok'}


def _source_meta(out, name):
    """Where a bench file the bake-off reads came from (its sidecar's commit/device/command), or None."""
    p = os.path.join(out, f'{name}.meta.json')
    if not os.path.exists(os.path.join(out, f'{name}.csv')):
        return None
    if not os.path.exists(p):
        return {'file': f'{name}.csv'}
    with open(p) as f:
        meta = json.load(f)
    return {'file': f'{name}.csv', **{k: meta.get(k) for k in ('git_commit', 'device', 'command')}}


def bakeoff(out='results', preset=None, runs_dir=None):
    """Tables and plots from the sweep's run records (results/runs/<preset>/<run>/). Deterministic: the
    files depend only on the records (and on <out>/memory.csv and latency.csv when present)."""
    runs_dir, preset = _resolve_runs_dir(out, preset, runs_dir)
    runs, skipped = load_runs(runs_dir)
    for s in skipped:
        print(f"[bakeoff] skipped run {s}")
    if not runs:
        raise ValueError(f"bakeoff: no finished runs (summary.json with status 'done') under {runs_dir}")
    print(f"[bakeoff] {len(runs)} finished runs from {runs_dir}")
    ooms, decode = _oom_thresholds(out), _decode_ms(out)

    # (model, lr) -> runs over seeds
    groups = {}
    for r in runs:
        s = r['summary']
        groups.setdefault(s['model_type'], {}).setdefault(float(s['learning_rate']), []).append(r)

    lr_rows, main_rows, curve_rows = [], [], []
    for mt in sorted(groups, key=_model_order):
        by_lr = groups[mt]
        stats = {lr: _mean_std([float(r['summary']['best_val_loss']) for r in rs]) for lr, rs in by_lr.items()}
        best_lr = min(sorted(stats), key=lambda lr: stats[lr][0])  # ties -> the smaller lr
        for lr in sorted(by_lr):
            mean, std = stats[lr]
            lr_rows.append(dict(model=mt, learning_rate=f'{lr:g}', n_seeds=str(len(by_lr[lr])),
                                best_val_loss_mean=_f(mean, '.4f'), best_val_loss_std=_f(std, '.4f'),
                                best=str(lr == best_lr)))
        rs = by_lr[best_lr]
        losses = [float(r['summary']['best_val_loss']) for r in rs]
        ppls = [math.exp(x) for x in losses]
        (lm, ls), (pm, ps) = _mean_std(losses), _mean_std(ppls)
        tps_runs = [float(r['summary']['tokens_per_s']) for r in rs if r['summary'].get('tokens_per_s') is not None]
        tps = _mean_std(tps_runs)[0] if tps_runs else None  # None: runs too short to time (smoke tests)
        n_params = sorted({int(r['summary']['n_params']) for r in rs})
        oom = ooms.get(mt, {})
        # how the best-LR runs executed (their tokens/s depend on it): compile / CUDA graphs as they ran
        modes = sorted({'+'.join(k for k in ('compile', 'cuda_graphs') if r['summary'].get(k, r['config'].get(k)))
                        or 'eager' for r in rs})
        main_rows.append(dict(
            model=mt, n_params='/'.join(str(n) for n in n_params), lrs_finished=' '.join(f'{lr:g}' for lr in sorted(by_lr)),
            best_lr=f'{best_lr:g}', n_seeds=str(len(rs)),
            seeds=' '.join(str(r['summary']['seed']) for r in rs),
            best_val_loss_mean=_f(lm, '.4f'), best_val_loss_std=_f(ls, '.4f'),
            val_ppl_mean=_f(pm, '.4f'), val_ppl_std=_f(ps, '.4f'),
            oom_context_b1=oom.get(1, '-'), oom_context_b4=oom.get(4, '-'),
            decode_ms_per_token_1024=_f(decode.get(mt, (None,))[0], '.3f'),
            decode_mode=decode[mt][1] if mt in decode else '-', train_tokens_per_s=_f(tps, '.0f'),
            train_mode=' / '.join(modes)))
        for r in rs:
            for e in r['evals']:
                curve_rows.append(dict(model=mt, learning_rate=f'{best_lr:g}', seed=str(r['summary']['seed']),
                                       iter=str(int(e['iter'])), flops=_f(float(e['flops']), '.6e'),
                                       val_loss=_f(float(e['val_loss']), '.4f'),
                                       val_ppl=_f(math.exp(float(e['val_loss'])), '.4f')))

    main_cols = ['model', 'n_params', 'lrs_finished', 'best_lr', 'n_seeds', 'seeds', 'best_val_loss_mean',
                 'best_val_loss_std', 'val_ppl_mean', 'val_ppl_std', 'oom_context_b1', 'oom_context_b4',
                 'decode_ms_per_token_1024', 'decode_mode', 'train_tokens_per_s', 'train_mode']
    write_csv(os.path.join(out, 'bakeoff.csv'), main_rows, main_cols)
    write_csv(os.path.join(out, 'bakeoff_lr.csv'), lr_rows,
              ['model', 'learning_rate', 'n_seeds', 'best_val_loss_mean', 'best_val_loss_std', 'best'])
    write_csv(os.path.join(out, 'bakeoff_ppl_vs_flops.csv'), curve_rows,
              ['model', 'learning_rate', 'seed', 'iter', 'flops', 'val_loss', 'val_ppl'])

    # metadata from the inputs only: the runs' commits, devices, versions, commands; never *now*
    def distinct(key):
        return sorted({json.dumps(r['config'].get(key), sort_keys=True) for r in runs})
    rel = os.path.relpath(runs_dir, out)
    write_json(os.path.join(out, 'bakeoff.meta.json'), {
        'name': 'bakeoff', 'preset': preset, 'runs_dir': rel.replace(os.sep, '/'), 'n_runs': len(runs),
        'runs': [r['name'] for r in runs], 'skipped_runs': skipped,
        'git_commit': [json.loads(s) for s in distinct('git_commit')],
        'device': [json.loads(s) for s in distinct('device')],
        'versions': [json.loads(s) for s in distinct('versions')],
        'command': [json.loads(s) for s in distinct('command')],
        'sources': {'memory': _source_meta(out, 'memory'), 'latency': _source_meta(out, 'latency')},
        'method': "best LR = lowest mean (over seeds) best val loss; loss and perplexity (exp of each seed's best "
                  "val loss) are mean ± sample std over the seeds at the best LR; tokens/s = mean of the runs' "
                  "summaries at the best LR, which depend on train_mode (how those runs executed: torch.compile, "
                  "CUDA graphs); lrs_finished = the LRs with a finished run; OOM context = first context whose fwd+bwd ran out of memory "
                  "(memory.csv; '>T' = none up to T); decode ms/token at context 1024 from latency.csv "
                  "(decode_mode: compiled graph = torch.compile'd step replayed from a CUDA graph, graph = the eager "
                  "step replayed from a CUDA graph, eager = launched op by op)",
    })
    plot_val_curves(runs, groups, {r['model']: float(r['best_lr']) for r in main_rows},
                    os.path.join(out, 'bakeoff_val_loss.png'))
    plot_ppl_vs_flops(curve_rows, os.path.join(out, 'bakeoff_ppl_vs_flops.png'))
    for r in main_rows:
        print(f"[bakeoff] {r['model']:>14}: best lr {r['best_lr']}, val loss {r['best_val_loss_mean']} ± "
              f"{r['best_val_loss_std']}, ppl {r['val_ppl_mean']} ± {r['val_ppl_std']} ({r['n_seeds']} seeds)")
    return main_rows


def _mean_curve(runs, x_key):
    """Mean over runs of val_loss at each eval iter: [(x, mean val loss)], x from the first run."""
    by_iter = {}
    for r in runs:
        for e in r['evals']:
            by_iter.setdefault(int(e['iter']), []).append((float(e[x_key]), float(e['val_loss'])))
    return [(v[0][0], sum(l for _, l in v) / len(v)) for it, v in sorted(by_iter.items())]


def plot_val_curves(runs, groups, best_lr, path):
    """One panel per model: mean val loss vs iteration for every LR (the best one bold)."""
    plt = _plt()
    mts = sorted(groups, key=_model_order)
    fig, axes = plt.subplots(1, len(mts), figsize=(4.5 * len(mts), 4), sharey=True, squeeze=False)
    for ax, mt in zip(axes[0], mts):
        lrs = sorted(groups[mt])
        for i, lr in enumerate(lrs):
            pts = _mean_curve(groups[mt][lr], 'iter')
            if pts:
                best = lr == best_lr[mt]
                ax.plot(*zip(*pts), color=plt.cm.viridis(i / max(1, len(lrs) - 1)), lw=2.2 if best else 1,
                        label=f'lr {lr:g}' + (' (best)' if best else ''))
        ax.set(title=mt, xlabel='iteration')
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('validation loss (mean over seeds)')
    fig.tight_layout()
    _savefig(fig, path)


def plot_ppl_vs_flops(curve_rows, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mt in dict.fromkeys(r['model'] for r in curve_rows):
        by_iter = {}
        for r in curve_rows:
            if r['model'] == mt:
                by_iter.setdefault(int(r['iter']), []).append((float(r['flops']), float(r['val_ppl'])))
        pts = [(v[0][0], sum(p for _, p in v) / len(v)) for _, v in sorted(by_iter.items()) if v[0][0] > 0]
        if pts:
            ax.plot(*zip(*pts), marker='o', ms=3, color=_color(mt), label=mt)
    ax.set(xscale='log', yscale='log', xlabel='cumulative training FLOPs', ylabel='validation perplexity',
           title='validation perplexity vs compute (best LR, mean over seeds)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)


# ----------------------------------------------------------------------------- selfcheck
def selfcheck(out='results', device='auto', models=None):
    """Each model module's selfcheck(device): fla kernels vs the torch reference. Returns the exit code
    (1 on any FAIL). On CPU there is nothing to compare (fla needs CUDA): prints a note, returns 0."""
    device = _resolve_device(device)
    if torch.device(device).type != 'cuda':
        print("[selfcheck] the self-checks compare fla's CUDA/Triton kernels with the torch references and need "
              "CUDA; this machine has none, so nothing was checked (the CPU references are covered by "
              "tests/). Exit 0.")
        return 0
    rows = []
    for mt, mod in available_models(models):
        if not hasattr(mod, 'selfcheck'):
            print(f"[selfcheck] {mt}: no selfcheck() (no fla kernels to check)")
            continue
        t0 = time.perf_counter()
        try:
            results = mod.selfcheck(device)
        except Exception as e:
            traceback.print_exc()
            results = [dict(name='selfcheck()', ok=False, max_rel_rms=float('nan'),
                            detail=f'raised {type(e).__name__}: {e}')]
        secs = time.perf_counter() - t0  # includes first-call kernel compilation and autotuning
        for r in results:
            rows.append(dict(model=mt, name=r.get('name'), ok=bool(r.get('ok')), max_rel_rms=r.get('max_rel_rms'),
                             model_seconds=secs, detail=r.get('detail', '')))
            print(f"[selfcheck] {'PASS' if r.get('ok') else 'FAIL'} {mt}: {r.get('name')} "
                  f"max_rel_rms={_fmt(r.get('max_rel_rms'))} {r.get('detail', '')}", flush=True)
        print(f"[selfcheck] {mt}: {secs:.1f} s (first calls compile and autotune the kernels; cached after)",
              flush=True)
    write_csv(os.path.join(out, 'selfcheck.csv'), rows,
              ['model', 'name', 'ok', 'max_rel_rms', 'model_seconds', 'detail'])
    write_meta(out, 'selfcheck', device, dict(models=models))
    n_fail = sum(not r['ok'] for r in rows)
    print(f"[selfcheck] {len(rows) - n_fail} PASS, {n_fail} FAIL")
    return 1 if n_fail else 0


# ----------------------------------------------------------------------------- report
def _md_table(rows, cols, headers=None):
    headers = headers or cols
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join(['---'] * len(cols)) + '|']
    for r in rows:
        lines.append('| ' + ' | '.join(str(r.get(c, '')) if r.get(c, '') != '' else '-' for c in cols) + ' |')
    return '\n'.join(lines)


def _pivot(rows, row_key, col_key, cell):
    """Markdown table: one row per row_key value, one column per col_key value, cells from cell(r)."""
    rks = list(dict.fromkeys(row_key(r) for r in rows))
    cks = list(dict.fromkeys(col_key(r) for r in rows))
    table = {(row_key(r), col_key(r)): cell(r) for r in rows}
    out = [dict({'_': rk}, **{ck: table.get((rk, ck), '-') for ck in cks}) for rk in rks]
    return out, ['_'] + cks


def _meta_lines(out, name):
    p = os.path.join(out, f'{name}.meta.json')
    if not os.path.exists(p):
        return f'*No metadata file {name}.meta.json.*'
    with open(p) as f:
        m = json.load(f)

    def one(x):
        return ', '.join(map(str, x)) if isinstance(x, list) else str(x)
    versions = m.get('versions')
    if isinstance(versions, list):
        versions = '; '.join(', '.join(f'{k} {v}' for k, v in sorted(d.items())) for d in versions if d)
    elif isinstance(versions, dict):
        versions = ', '.join(f'{k} {v}' for k, v in sorted(versions.items()))
    lines = [f"- command: `{one(m.get('command'))}`" if not isinstance(m.get('command'), list) or
             len(m['command']) <= 1 else f"- commands: {len(m['command'])} distinct, e.g. `{m['command'][0]}`",
             f"- git commit: `{one(m.get('git_commit'))}`", f"- device: {one(m.get('device'))}",
             f"- versions: {versions}"]
    if 'settings' in m:
        lines.append(f"- settings: `{json.dumps(m['settings'], sort_keys=True)}`")
    if 'preset' in m:
        lines.append(f"- preset: `{m['preset']}`, {m.get('n_runs')} runs from `{m.get('runs_dir')}`"
                     + (f", {len(m['skipped_runs'])} unfinished runs skipped" if m.get('skipped_runs') else ''))
    if 'method' in m:
        lines.append(f"- method: {m['method']}")
    return '\n'.join(lines)


def report(out='results', readme=False):
    """<out>/REPORT.md from whatever result files exist; what is missing is said to be missing.
    readme=True: the bake-off tables also replace the README block between the bakeoff-table markers."""
    def have(name):
        return os.path.exists(os.path.join(out, name))

    def img(name, alt):
        return f"![{alt}]({name})" if have(name) else f"*Missing plot `{name}`.*"

    md = ["# Token-mixer bake-off: report", "",
          "Generated by `python bench.py report` from the result files in this folder; every number below "
          "is read from those files. Each section lists how its file was made (command, commit, device, versions).",
          ""]

    def section(title, name, how, body, missing_note=''):
        """A '## title' section: body(rows of <out>/name) -> lines, or a line saying the file is missing."""
        md.extend([f"## {title}", ""])
        if have(name):
            md.extend(body(read_csv(os.path.join(out, name))))
        else:
            md.append(f"*Missing: `{name}` not found in this folder (make it with `{how}`).*" + missing_note)
        md.append("")

    def selfcheck_body(rows):
        for r in rows:
            r['result'] = 'PASS' if r['ok'] == 'True' else 'FAIL'
        return [_md_table(rows, ['model', 'name', 'result', 'max_rel_rms', 'model_seconds', 'detail'],
                          ['model', 'check', 'result', 'max rel RMS', 'model s', 'detail']), "",
                "`model s`: seconds of that model's checks, first-call kernel compilation and autotuning included.",
                "", _meta_lines(out, 'selfcheck')]

    def params_body(rows):
        lines = [_md_table(rows, ['model', 'n_layer', 'n_head', 'n_embd', 'd_ff', 'd_ff_from', 'head_dims',
                                  'total_params', 'non_embedding_params', 'diff_vs_vanilla_pct', 'mixer_config'],
                           ['model', 'layers', 'heads', 'n_embd', 'd_ff', 'd_ff from', 'head dims', 'total params',
                            'non-embedding', '% vs vanilla', 'mixer config']), ""]
        mp = os.path.join(out, 'params.meta.json')
        if os.path.exists(mp):
            with open(mp) as f:
                notes = json.load(f).get('d_ff_solve', [])
            if notes:
                lines += ["How d_ff was solved (`model.solve_d_ff`, matching *total* trainable parameters, tied head "
                          "counted once):", ""] + [f"- {n}" for n in notes] + [""]
        return lines + [_meta_lines(out, 'params')]

    bakeoff_tables = []

    def bakeoff_body(rows):
        for r in rows:
            r['loss'] = f"{r['best_val_loss_mean']} ± {r['best_val_loss_std']}"
            r['ppl'] = f"{r['val_ppl_mean']} ± {r['val_ppl_std']}"
        lines = [_md_table(rows, ['model', 'n_params', 'lrs_finished', 'best_lr', 'n_seeds', 'loss', 'ppl',
                                  'oom_context_b1', 'oom_context_b4', 'decode_ms_per_token_1024', 'decode_mode',
                                  'train_tokens_per_s', 'train_mode'],
                           ['model', 'params', 'LRs finished', 'best LR', 'seeds', 'best val loss', 'val perplexity',
                            'OOM context (B=1)', 'OOM context (B=4)', 'decode ms/token @1024', 'decode mode',
                            'train tokens/s', 'runs executed with']), ""]
        bakeoff_tables.append(lines)  # the README quotes these (readme=True); the list grows below
        if have('bakeoff_lr.csv'):
            lr = read_csv(os.path.join(out, 'bakeoff_lr.csv'))
            lrs = sorted({r['learning_rate'] for r in lr}, key=float)
            table, cols = _pivot(lr, lambda r: r['model'], lambda r: r['learning_rate'],
                                 lambda r: (f"**{r['best_val_loss_mean']}**" if r['best'] == 'True'
                                            else r['best_val_loss_mean']) + f" (n={r['n_seeds']})")
            lines += ["Mean best validation loss per learning rate (best in bold):", "",
                      _md_table(table, ['_'] + lrs, ['model \\ lr'] + lrs), ""]
        return lines + [img('bakeoff_val_loss.png', 'validation loss curves'), "",
                        img('bakeoff_ppl_vs_flops.png', 'validation perplexity vs FLOPs'), "", _meta_lines(out, 'bakeoff')]

    def memory_body(rows):
        err_cell, err_lines = errors_of(rows)

        def cell(r):
            if r['status'] == 'ok' and r['peak_gib']:
                return f"{float(r['peak_gib']):.3f}"
            return {'ok (peak not measured on cpu)': 'n/m'}.get(r['status'], err_cell(r['status']).split(' (')[0])
        table, cols = _pivot(rows, lambda r: r['context'], lambda r: f"{r['model']} B={r['batch']}", cell)
        lines = ["Peak training memory, fwd+bwd (GiB; OOM = out of memory; skipped = past the OOM; n/m = not "
                 "measured):", "", _md_table(table, cols, ['context'] + cols[1:]), "", *err_lines]
        timed = [r for r in rows if r.get('fwdbwd_ms')]
        if timed:
            table, cols = _pivot(timed, lambda r: r['context'], lambda r: f"{r['model']} B={r['batch']}",
                                 lambda r: f"{float(r['fwdbwd_ms']):.2f}" + (
                                     f" ({float(r['fwdbwd_vs_vanilla']):.2f}x)" if r.get('fwdbwd_vs_vanilla') else ''))
            lines += ["fwd+bwd time per step (ms, median; in parentheses: over vanilla's at the same batch and "
                      "context, same run):", "", _md_table(table, cols, ['context'] + cols[1:]), ""]
        st = {(r['context'], r['model']): r['state_bytes'] for r in rows}
        table, cols = _pivot([dict(context=c, model=mt, b=b) for (c, mt), b in st.items()],
                             lambda r: r['context'], lambda r: r['model'], lambda r: f"{int(r['b']):,}")
        return lines + ["Decoding-state bytes per sequence (KV cache grows with context; a recurrent state does not):",
                        "", _md_table(table, cols, ['context'] + cols[1:]), "", img('memory.png', 'memory wall'), "",
                        _meta_lines(out, 'memory')]

    def errors_of(rows):
        """(cell text for a status, footnote lines): errors are numbered once, not repeated in every cell."""
        errs = list(dict.fromkeys(r['status'] for r in rows if r['status'].startswith('error')))
        cell = lambda st: f"error {errs.index(st) + 1}" if st in errs else st  # noqa: E731
        return cell, (["Errors: " + '; '.join(f"({i}) {e}" for i, e in enumerate(errs, 1)), ""] if errs else [])

    def latency_body(rows):
        err_cell, err_lines = errors_of(rows)

        def ms(k):
            return lambda r: f"{float(r[k]):.3f}" if r['status'] == 'ok' and r.get(k) else (
                '-' if r['status'] == 'ok' else err_cell(r['status']))
        modes = list(dict.fromkeys(_decode_mode(r) for r in rows if r['status'] == 'ok'))
        tables = [('Prefill time (ms) vs prompt length', 'prefill_ms'),
                  ('Decode time per token (ms) with the cache/state, in the fastest mode measured at each context ('
                   + '; '.join(f"{mt}: " + ' / '.join(dict.fromkeys(_decode_mode(r) for r in rows if r['model'] == mt
                                                                     and r['status'] == 'ok'))
                               for mt in dict.fromkeys(r['model'] for r in rows if r['status'] == 'ok')) + ')',
                   'decode_ms_per_token')]
        if modes != ['eager']:
            titles = {'compiled graph': 'torch.compile\'d step replayed from a CUDA graph',
                      'graph': 'eager step replayed from a CUDA graph', 'eager': 'eager steps, launched op by op'}
            ok = [r for r in rows if r['status'] == 'ok']
            tables += [(f"Decode ms/token, {titles[md]}, same run", col) for md, col in _DECODE_COL.items()
                       if any(r.get(col) for r in ok) and {_decode_mode(r) for r in ok} != {md}]
        lines = []
        for title, key in tables:
            table, cols = _pivot(rows, lambda r: r['context'], lambda r: r['model'], ms(key))
            lines += [f"{title}:", "", _md_table(table, cols, ['context'] + cols[1:]), ""]
        lines += err_lines
        notes = list(dict.fromkeys(f"{r['model']}: {r['note']}" for r in rows if r.get('note')))
        lines += [f"Notes: {'; '.join(notes)}", ""] if notes else []
        nc = [r for r in rows if r.get('nocache_ms_per_token')]
        if nc:
            lines += ["Vanilla without a KV cache (an eager full forward over the whole context per token), same "
                      "run, against the cached steps run eagerly (the cache alone) and in the fastest mode:", "",
                      _md_table([dict(r, nc=f"{float(r['nocache_ms_per_token']):.3f}",
                                      c=f"{float(r.get('decode_eager_ms_per_token') or r['decode_ms_per_token']):.3f}",
                                      x=f"{float(r['nocache_over_cache']):.1f}x",
                                      f=f"{float(r['decode_ms_per_token']):.3f} ({_decode_mode(r)})",
                                      xf=f"{float(r['nocache_ms_per_token']) / float(r['decode_ms_per_token']):.1f}x")
                                 for r in nc],
                                ['model', 'context', 'c', 'nc', 'x', 'f', 'xf'],
                                ['model', 'context', 'cached, eager steps', 'no cache', 'no cache / cached eager',
                                 'cached, fastest mode', 'no cache / cached fastest']), "",
                      "(ms/token. At batch 1 an eager step is bound by launching its kernels one at a time: the same step "
                      "replayed from a CUDA graph is several times faster, tables above. The recompute is launched "
                      "the same way, so at short contexts it is no dearer than the cached eager step, even cheaper "
                      "where its ratio is below 1x; the cache pays once the context is long, and with the graphs.)", ""]
        return lines + [img('latency.png', 'latency vs context'), "", _meta_lines(out, 'latency')]

    def vs_nanogpt_body(rows):
        return [_md_table(rows, ['impl', 'iters', 'median_ms', 'p10_ms', 'p90_ms', 'ratio_vs_nanogpt'],
                          ['implementation', 'timed iterations', 'median ms/iter', 'p10', 'p90', 'vs nanoGPT']), "",
                _meta_lines(out, 'vs_nanogpt')]

    def throughput_body(rows):
        err_cell, err_lines = errors_of(rows)
        _add_vs_vanilla(rows, 'ms_per_iter', 'vs_vanilla')  # files written before the column existed
        for r in rows:
            ok = r['status'] == 'ok'
            r['ms'] = f"{float(r['ms_per_iter']):.2f}" if ok else err_cell(r['status'])
            r['x_van'] = f"{float(r['vs_vanilla']):.2f}x" if ok and r.get('vs_vanilla') else '-'
            r['tps'] = f"{float(r['tokens_per_s']):,.0f}" if ok else '-'
            r['mfu_pct'] = f"{100 * float(r['mfu']):.1f}" if ok and r['mfu'] else '-'
        return [_md_table(rows, ['model', 'batch', 'context', 'ms', 'x_van', 'tps', 'mfu_pct', 'compile', 'cuda_graphs'],
                          ['model', 'B', 'T', 'ms/iter', 'x vanilla (same run)', 'tokens/s', 'MFU %', 'torch.compile',
                           'CUDA graph']), "",
                *err_lines,
                "MFU counts attention over the full T x T score matrix, as nanoGPT and PaLM do; a causal kernel "
                "does about half of that work, so at long context vanilla's MFU reads up to 2x high.", "",
                img('throughput.png', 'training throughput'), "", _meta_lines(out, 'throughput')]

    def scaling_body(rows):
        for r in rows:
            ok = r['status'] == 'ok'
            r['shape'] = f"{r['gpus']} x {r['batch']} x {r['context']}"
            for k, f in (('single_tokens_per_s', '{:,.0f}'), ('ddp_tokens_per_s', '{:,.0f}'), ('scaling', '{:.2f}x'),
                         ('single_final_val', '{:.4f}'), ('ddp_final_val', '{:.4f}'), ('max_train_loss_diff', '{:.3f}')):
                r[k + '_'] = f.format(float(r[k])) if ok and r.get(k) else ('-' if ok else r['status'])
        return [_md_table(rows, ['model', 'shape', 'iters', 'single_tokens_per_s_', 'ddp_tokens_per_s_', 'scaling_',
                                 'single_final_val_', 'ddp_final_val_', 'max_train_loss_diff_'],
                          ['model', 'global batch (GPUs x B x T)', 'iters', '1 GPU tokens/s', 'DDP tokens/s',
                           'scaling', '1 GPU final val', 'DDP final val', 'max train-loss gap']), "",
                "1 GPU = one process doing every micro-step of the global batch; DDP = one micro-step per GPU. "
                "Each rank draws its own data, so the curves agree statistically, not step for step.", "",
                img('scaling_loss.png', 'loss curves, DDP vs one GPU'), "", _meta_lines(out, 'scaling')]

    section('Kernel self-checks (fla vs reference)', 'selfcheck.csv', 'python bench.py selfcheck', selfcheck_body,
            " Self-checks need CUDA.")
    section('Parameters', 'params.csv', 'python bench.py params', params_body)
    section('Bake-off (sweep results)', 'bakeoff.csv', 'python bench.py bakeoff --preset=<preset>', bakeoff_body,
            " (needs the sweep's run records in results/runs/<preset>/).")
    section('Memory', 'memory.csv', 'python bench.py memory', memory_body)
    section('Generation latency (batch 1)', 'latency.csv', 'python bench.py latency', latency_body)
    section('Training speed against nanoGPT (same shape, same run)', 'vs_nanogpt.csv',
            'python bench.py vs_nanogpt (karpathy/nanoGPT cloned into .nanogpt/)', vs_nanogpt_body)
    section('Training throughput', 'throughput.csv', 'python bench.py throughput', throughput_body)
    section('Data-parallel scaling (DDP)', 'scaling.csv', 'python bench.py scaling (2+ GPUs)', scaling_body)

    path = os.path.join(out, 'REPORT.md')
    os.makedirs(out, exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(md))
    print(f"[bench] wrote {path}")
    if readme:
        if not bakeoff_tables:
            raise FileNotFoundError(f"no bakeoff.csv in {out}: run `python bench.py bakeoff --out={out}` first")
        _readme_block(BAKEOFF_MARK, f"Generated by `python bench.py report --out={out} --readme=True` from "
                                    f"{out}/bakeoff.csv and bakeoff_lr.csv.\n\n" + '\n'.join(bakeoff_tables[0]))
    return path


# ----------------------------------------------------------------------------- all + CLI
def model_kw_from_runs(runs_dir):
    """{model_type: GPTConfig kwargs} of the models a sweep trained, read from its runs' config.json, so
    that the benchmarks measure the models the bake-off compares (the CPU preset's are smaller)."""
    runs, _ = load_runs(runs_dir)
    kw = {}
    for r in runs:
        mt = r['summary']['model_type']
        if mt in kw:
            continue
        try:
            mod = model.get_model_module(mt)
        except Exception as e:
            print(f"[bench] model {mt!r} of the runs does not import ({e}); the benchmarks skip it")
            continue
        names = {f.name for f in fields(mod.GPTConfig)} - {'model_type'}
        # the requested config: d_ff=-1 is solved again at the training block_size (model_kwargs), the same
        # width the run had, and the params table can say it was solved
        kw[mt] = {k: v for k, v in r['config']['config'].items() if k in names}
    return kw


def run_all(out='results', tiny=None, device='auto', models=None, preset=None, runs_dir=None, compile='auto',
            model_kw=None, wandb_log=False, wandb_project='attention-bakeoff'):
    """params, memory, latency, throughput, vs_nanogpt (when .nanogpt/ holds karpathy/nanoGPT), bakeoff,
    report (what train_runner's sweep calls at its end).
    tiny=None: small benchmark sizes when there is no CUDA. The models benchmarked are those of the
    sweep's run records when there are any (model_kw), else the modules' defaults (or TINY).
    A step that fails is reported and the others still run. Returns {step: 'ok' | 'failed: ...'}."""
    device = _resolve_device(device)
    if tiny is None:
        tiny = torch.device(device).type != 'cuda'
    try:
        rdir, preset = _resolve_runs_dir(out, preset, runs_dir)
    except ValueError as e:
        rdir = None
        print(f"[bench] no run records: {e}")
    if model_kw is None and rdir is not None:
        model_kw = model_kw_from_runs(rdir) or None
        if model_kw:
            print(f"[bench] benchmarking the models of the run records in {rdir}: {model_kw}")
    steps = [('params', lambda: params(out, tiny, device, models, model_kw=model_kw)),
             ('memory', lambda: memory(out, tiny, device, models, model_kw=model_kw)),
             ('latency', lambda: latency(out, tiny, device, models, model_kw=model_kw)),
             ('throughput', lambda: throughput(out, tiny, device, models, compile=compile, model_kw=model_kw)),
             ('vs_nanogpt', lambda: vs_nanogpt(out, tiny=tiny, device=device, iters=60 if tiny else 500)),
             ('bakeoff', lambda: bakeoff(out, preset, rdir)),
             ('report', lambda: report(out))]
    status = {}
    for name, fn in steps:
        print(f"===== bench {name} =====", flush=True)
        if name == 'bakeoff' and rdir is None:
            status[name] = 'skipped: no run records'
            continue
        if name == 'vs_nanogpt' and not os.path.exists(os.path.join(NANOGPT_DIR, 'train.py')):
            status[name] = 'skipped: karpathy/nanoGPT not cloned into .nanogpt/'
            print(f"[bench] {status[name]}")
            continue
        try:
            fn()
            status[name] = 'ok'
        except Exception as e:
            traceback.print_exc()
            status[name] = f'failed: {type(e).__name__}: {e}'
            print(f"[bench] {name} {status[name]}")
    if wandb_log:
        _wandb_log(out, wandb_project, f'bench-{preset or os.path.basename(os.path.normpath(out))}')
    print(f"[bench] {json.dumps(status)}")
    return status


def _wandb_log(out, project, name):
    """Optional: the result tables and plots as one wandb run (never fails the benchmarks)."""
    try:
        import wandb
        run = wandb.init(project=project, name=name, job_type='bench')
        for f in sorted(os.listdir(out)):
            p = os.path.join(out, f)
            if f.endswith('.csv'):
                rows = read_csv(p)
                if rows:
                    run.log({f[:-4]: wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
            elif f.endswith('.png'):
                run.log({f[:-4]: wandb.Image(p)})
        run.finish()
    except Exception as e:
        print(f"[bench] wandb logging failed ({type(e).__name__}: {e}); the local files are complete")


def _all_cli(out='results', tiny=None, device='auto', models=None, preset=None, runs_dir=None, compile='auto',
             model_kw=None, wandb_log=False):
    status = run_all(out, tiny, device, models, preset, runs_dir, compile, model_kw, wandb_log)
    return 1 if any(v.startswith('failed') for v in status.values()) else 0


NANOGPT_DIR = os.path.join(HERE, '.nanogpt')  # karpathy/nanoGPT, cloned by the user (git-ignored)
NANOGPT_TIME = re.compile(r'^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms')


def vs_nanogpt(out='results', nanogpt_dir=None, iters=500, skip=20, tiny=False, device='auto', compile='auto'):
    """Training speed side by side with karpathy/nanoGPT in one run: its train.py with its
    config/train_shakespeare_char.py, then this repo's vanilla at the same shape, both for `iters` steps,
    logging (and so synchronising) every iteration, evaluation only at the ends. Reports the median ms/iter
    of each after the first `skip` iterations (compilation, autotuning) and ours / nanoGPT's.
    nanoGPT is not part of this repository: clone it into nanogpt_dir (git-ignored) first."""
    import subprocess
    import tempfile
    device = _resolve_device(device)
    nanogpt_dir = nanogpt_dir or NANOGPT_DIR
    script = os.path.join(nanogpt_dir, 'train.py')
    if not os.path.exists(script):
        raise FileNotFoundError(f"{script} not found: clone karpathy/nanoGPT into {nanogpt_dir} first")
    load_dataset('shakespeare_char', 'cpu')  # prepares data/shakespeare_char if needed
    link = os.path.join(nanogpt_dir, 'data', 'shakespeare_char')
    if os.path.islink(link) and not os.path.exists(link):  # a dangling link, e.g. a copy made elsewhere
        os.remove(link)
    if not os.path.exists(link):  # nanoGPT reads data/<dataset>/ relative to its working directory
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.join(HERE, 'data', 'shakespeare_char'), link)
    use_compile = (torch.device(device).type == 'cuda') if compile == 'auto' else bool(compile)
    shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=8) if tiny else {}
    common = dict(max_iters=iters, lr_decay_iters=iters, eval_interval=iters, eval_iters=1, log_interval=1,
                  device=device, compile=use_compile, **shape)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, 'train.py', 'config/train_shakespeare_char.py', f'--out_dir={tmp}/nanogpt',
               *(f'--{k}={v}' for k, v in common.items())]
        print(f"[vs_nanogpt] nanoGPT: {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, cwd=nanogpt_dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nanoGPT failed (exit {r.returncode}): {r.stderr[-2000:]}")
        theirs = [float(m.group(2)) for m in map(NANOGPT_TIME.match, r.stdout.splitlines()) if m]
        train(None, {**common, 'model_type': 'vanilla', 'out_dir': f'{tmp}/ours', 'dropout': 0.2})
        with open(f'{tmp}/ours/metrics.jsonl') as f:
            ours = [row['ms_per_iter'] for row in map(json.loads, f) if row['kind'] == 'train']
    if len(theirs) <= skip or len(ours) <= skip:
        raise RuntimeError(f"too few timed iterations (nanoGPT {len(theirs)}, ours {len(ours)}) for skip={skip}")
    rows = []
    for impl, ts in (('nanoGPT', theirs[skip:]), ('this repo (vanilla)', ours[skip:])):
        ts = sorted(ts)
        rows.append(dict(impl=impl, iters=len(ts), median_ms=_median(ts), p10_ms=ts[len(ts) // 10],
                         p90_ms=ts[(9 * len(ts)) // 10]))
    rows[1]['ratio_vs_nanogpt'] = rows[1]['median_ms'] / rows[0]['median_ms']
    rows[0]['ratio_vs_nanogpt'] = 1.0
    write_csv(os.path.join(out, 'vs_nanogpt.csv'), rows,
              ['impl', 'iters', 'median_ms', 'p10_ms', 'p90_ms', 'ratio_vs_nanogpt'])
    write_meta(out, 'vs_nanogpt', device, dict(nanogpt_dir=nanogpt_dir, iters=iters, skip=skip, tiny=tiny,
                                               compile=use_compile),
               method='both log every iteration (a sync per step); median of per-iteration times after `skip`')
    print(f"[vs_nanogpt] median ms/iter: nanoGPT {rows[0]['median_ms']:.2f}, ours {rows[1]['median_ms']:.2f} "
          f"(ratio {rows[1]['ratio_vs_nanogpt']:.2f})")
    return rows


SCALING_SHAPES = ([(32, 256), (1, 8192)], [(8, 32)])  # per-process micro-batch (B, T): (full, tiny)


def scaling(out='results', tiny=False, device='auto', models='vanilla,delta', shapes=None, gpus=2, iters=None,
            model_kw=None):
    """DDP over `gpus` GPUs of this host against one GPU at the same global batch: training tokens/s of
    each, their ratio (the scaling factor), and both loss curves. For each model and micro-batch shape
    (B, T), train_runner trains twice: one process doing `gpus` micro-steps of B x T per step, then
    torchrun with `gpus` processes doing one each. CUDA graphs are off in both (DDP does not capture
    them), so the ratio measures data parallelism alone. Each process draws its own data stream, so the
    curves agree statistically, not bit for bit. On CPU the processes use gloo (tiny sizes, for tests).
    Writes <out>/scaling.csv, scaling_loss.png and the runs' records under <out>/scaling_runs/."""
    import subprocess
    device = _resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    gpus = int(gpus)
    if gpus < 2:
        raise ValueError(f"gpus must be >= 2 (DDP against one process), got {gpus}")
    if cuda and gpus > torch.cuda.device_count():
        raise ValueError(f"gpus={gpus} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    shapes = [tuple(int(v) for v in sh) for sh in (shapes or SCALING_SHAPES[tiny])]
    iters = int(iters or (20 if tiny else 300))
    env = {**os.environ, **({} if cuda else {'OMP_NUM_THREADS': '1'})}
    os.makedirs(os.path.join(out, 'scaling_runs'), exist_ok=True)
    rows, curves = [], {}
    for mt, mod in available_models(_as_list(models)):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        for B, T in shapes:
            args = [f'--{k}={v}' for k, v in {**kw, 'block_size': T}.items() if k != 'model_type']
            args += [f'--model_type={mt}', f'--batch_size={B}', f'--gradient_accumulation_steps={gpus}',
                     f'--max_iters={iters}', f'--lr_decay_iters={iters}', f'--eval_interval={iters}',
                     '--eval_iters=2', f'--eval_batch_size={4 if tiny else 8}', '--log_interval=10',
                     '--warmup_iters=10', '--cuda_graphs=False', '--wandb_log=False', '--dropout=0.0',
                     f"--device={'cuda' if cuda else 'cpu'}"] + ([] if cuda else ['--compile=False'])
            row = dict(model=mt, batch=B, context=T, gpus=gpus, tokens_per_step=gpus * B * T, iters=iters)
            res = {}
            for kind in ('single', 'ddp'):
                run_dir = os.path.join(out, 'scaling_runs', f'{mt}-B{B}-T{T}-{kind}')
                launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone',
                                              f'--nproc_per_node={gpus}'] if kind == 'ddp' else [])
                cmd = launch + ['train_runner.py', *args, f'--out_dir={run_dir}']
                print(f"[scaling] {mt} B={B} T={T} {kind}: {' '.join(cmd[1:])}", flush=True)
                r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
                with open(os.path.join(out, 'scaling_runs', f'{mt}-B{B}-T{T}-{kind}.log'), 'w') as f:
                    f.write(r.stdout + r.stderr)
                if r.returncode != 0:
                    res[kind] = f"error (exit {r.returncode}): {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}"
                    continue
                with open(os.path.join(run_dir, 'summary.json')) as f:
                    summ = json.load(f)
                with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
                    curve = [(m['iter'], m['loss']) for m in map(json.loads, f) if m['kind'] == 'train']
                res[kind] = summ
                curves[(mt, B, T, kind)] = curve
            if isinstance(res.get('single'), str) or isinstance(res.get('ddp'), str):
                row['status'] = '; '.join(f"{k}: {v}" for k, v in res.items() if isinstance(v, str))
            else:
                a, b = res['single'], res['ddp']
                ca, cb = dict(curves[(mt, B, T, 'single')]), dict(curves[(mt, B, T, 'ddp')])
                common_iters = sorted(set(ca) & set(cb) - {min(ca)})  # the first window is still warming up
                row.update(status='ok', single_tokens_per_s=a['tokens_per_s'], ddp_tokens_per_s=b['tokens_per_s'],
                           scaling=b['tokens_per_s'] / a['tokens_per_s'],
                           single_final_val=a['final_val_loss'], ddp_final_val=b['final_val_loss'],
                           val_diff=b['final_val_loss'] - a['final_val_loss'],
                           max_train_loss_diff=max((abs(ca[i] - cb[i]) for i in common_iters), default=None))
            rows.append(row)
            print(f"[scaling] {mt} B={B} T={T}: " + (f"{row['single_tokens_per_s']:,.0f} -> "
                  f"{row['ddp_tokens_per_s']:,.0f} tok/s on {gpus} ({row['scaling']:.2f}x); final val "
                  f"{row['single_final_val']:.4f} vs {row['ddp_final_val']:.4f}"
                  if row['status'] == 'ok' else row['status']), flush=True)
    write_csv(os.path.join(out, 'scaling.csv'), rows,
              ['model', 'batch', 'context', 'gpus', 'tokens_per_step', 'iters', 'status', 'single_tokens_per_s',
               'ddp_tokens_per_s', 'scaling', 'single_final_val', 'ddp_final_val', 'val_diff',
               'max_train_loss_diff'])
    write_meta(out, 'scaling', device, dict(tiny=tiny, models=models, shapes=shapes, gpus=gpus, iters=iters,
                                            model_kw=model_kw),
               method="tokens/s = the run's summary (global tokens per step / median ms per step, first timing "
                      "window excluded); single = one process with `gpus` micro-steps per step, ddp = torchrun "
                      "with `gpus` processes of one micro-step, same global batch, CUDA graphs off in both; "
                      "max_train_loss_diff over the logged steps after the first")
    plt = _plt()
    keys = list(dict.fromkeys(k[:3] for k in curves))
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
        for ax, (mt, B, T) in zip(axes[0], keys):
            for kind, style in (('single', '-'), ('ddp', '--')):
                if (mt, B, T, kind) in curves:
                    ax.plot(*zip(*curves[(mt, B, T, kind)]), style, color=_color(mt),
                            label='1 process' if kind == 'single' else f'DDP, {gpus} processes')
            ax.set(title=f'{mt}, {gpus} x {B} x {T} tokens/step', xlabel='iteration', ylabel='train loss')
            ax.legend(fontsize=7)
        fig.tight_layout()
        _savefig(fig, os.path.join(out, 'scaling_loss.png'))
    return rows


README = os.path.join(HERE, 'README.md')
RUNS_MARK = ('<!-- runs-table:start -->', '<!-- runs-table:end -->')
BAKEOFF_MARK = ('<!-- bakeoff-table:start -->', '<!-- bakeoff-table:end -->')


def runs(runs_dir='results/h200', readme=False):
    """A markdown table of every finished run (summary.json + config.json) below runs_dir. With readme=True
    it replaces the README block between the runs-table markers, so the README quotes only these files."""
    rows = []
    for root, _, files in sorted(os.walk(runs_dir)):
        if 'summary.json' not in files or 'config.json' not in files:
            continue
        with open(os.path.join(root, 'summary.json')) as f:
            s = json.load(f)
        with open(os.path.join(root, 'config.json')) as f:
            c = json.load(f)
        rows.append({
            'run': f"[{os.path.relpath(root, runs_dir)}]({os.path.relpath(root, HERE)})", 'model': s['model_type'],
            'params': f"{s['n_params']:,}", 'lr': f"{s['learning_rate']:g}", 'iters': str(s['iters']),
            'best val loss (iter)': f"{s['best_val_loss']:.4f} ({s['best_iter']})",
            'final val loss': f"{s['final_val_loss']:.4f}",
            'median ms/iter': _f(s.get('median_ms_per_iter'), '.2f'), 'wall s': f"{s['wall_s']:.0f}",
            'ran with': '+'.join(k for k in ('compile', 'cuda_graphs') if s.get(k, c.get(k))) or 'eager',
            'device': c.get('device', '?'), 'commit': str(c.get('git_commit', '?'))[:10]})
    cols = list(rows[0]) if rows else ['run']
    table = _md_table(rows, cols) if rows else f"(no finished runs under {runs_dir})"
    body = f"Generated by `python bench.py runs --runs_dir={runs_dir} --readme=True` from the run records.\n\n{table}"
    print(body)
    if readme:
        _readme_block(RUNS_MARK, body)
    return rows


def _readme_block(marks, body):
    """Replace what stands between the two marker lines in README.md with body."""
    with open(README) as f:
        text = f.read()
    a, b = text.index(marks[0]) + len(marks[0]), text.index(marks[1])
    with open(README, 'w') as f:
        f.write(text[:a] + '\n' + body + '\n' + text[b:])


COMMANDS = {**{f.__name__: f for f in (params, memory, latency, throughput, bakeoff, report, selfcheck, runs,
                                        vs_nanogpt, profile, scaling)},
            'all': _all_cli}
all = run_all  # bench.all(...) as in the docs (shadows the builtin in this module only; bench never uses it)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"usage: python bench.py <{'|'.join(COMMANDS)}> [--key=value ...]")
        return 2 if argv and argv[0] not in ('-h', '--help') else 0
    fn = COMMANDS[argv[0]]
    valid = list(inspect.signature(fn).parameters)
    kwargs = {}
    for arg in argv[1:]:
        if not arg.startswith('--') or '=' not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --key=value; valid keys for {argv[0]}: {', '.join(valid)}")
        k, v = arg[2:].split('=', 1)
        if k not in valid:
            raise SystemExit(f"unknown key {k!r} for {argv[0]}; valid keys: {', '.join(valid)}")
        kwargs[k] = _parse_value(v)
    try:
        rc = fn(**kwargs)
    except ValueError as e:  # bad input (an unknown model, preset...): the message names the valid choices
        raise SystemExit(f"error: {e}")
    return rc if isinstance(rc, int) else 0


if __name__ == '__main__':
    sys.exit(main())
