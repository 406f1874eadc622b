"""
Benchmarks of the four token mixers, and the generated report.

    python bench.py <sub-command> [--key=value ...]
    python bench.py <sub-command> --help     # its keys, with defaults and meanings

    params      parameter-matching table (layers, heads, widths, solved d_ff, total params, % vs vanilla)
    memory      peak training memory (fwd+bwd) vs context 256 -> 131072, batch 1 and 4; OOM wall;
                decoding-state bytes per sequence (KV cache vs recurrent state)
    latency     batch-1 generation: prefill time vs prompt length, per-token decode time with the
                cache/state, and vanilla's no-cache recompute path for comparison
    decode_throughput  decoding tokens/s at batch 1 -> 256 and the largest batch that fits, contexts 1024 -> 32768
    throughput  training ms/iter, tokens/s and MFU at the training shape and at long context
    vs_nanogpt  training speed side by side with karpathy/nanoGPT (cloned into .nanogpt/), one run each
    bakeoff     tables + plots from the sweep's run records in <out>/runs/ (the sweep's layout:
                results/<preset>/runs/<run>/; deterministic)
    report      <out>/REPORT.md from whatever result files exist
    runs        a markdown table of every finished run below a folder (and the README's runs block)
    selfcheck   each model's fla-kernel-vs-reference check (CUDA); non-zero exit on any FAIL
    profile     where a training step's time goes: wall vs GPU kernel time, kernels/iter, top kernels
    scaling     DDP over N GPUs against one at the same global batch: tokens/s ratio and both loss curves
    all         params, memory, latency, decode_throughput, throughput, vs_nanogpt, bakeoff, report
    mqar        the MQAR grid's mqar.csv, mqar_best.csv, plots and REPORT.md from its run records
                (results/mqar/runs/; deterministic)
    state_tracking  the state-tracking grid's state_tracking.csv, plot and REPORT.md from its run records
    length_gen  the bake-off's checkpoints on the test split at contexts 256 -> 4096: loss per position
                bucket (vanilla with learned positions slides its window); length_generalization.csv

Every sub-command is also a function: bench.params(out='results', tiny=False, device='auto', ...).
Common keys: --out=results (output folder), --tiny=True (each module's TINY config and small sizes,
for CPU tests), --device=auto|cpu|cuda, --models=vanilla,delta (default: every model in
model.MODEL_TYPES whose module imports). Values are Python literals: --contexts=256,512 --compile=True.

Each benchmark writes <out>/<name>.csv, a sidecar <out>/<name>.meta.json (command, git commit, device,
library versions, settings) and a PNG. The bake-off's files depend only on the run records they are
made from (no timestamp, no commit of *now*), so they are byte-for-byte reproducible.
"""

import inspect
import json
import os
import re
import sys
import time
import traceback
from dataclasses import fields, replace

import torch
from torch.nn import functional as F

import model
from report import (DECODE_COL, GENERATE_COL, add_vs_vanilla, bakeoff, bakeoff_cells, has_test_split, load_runs,
                    model_kw_from_runs, mqar, plot_decode_throughput, plot_latency, plot_length_gen, plot_memory,
                    plot_scaling, plot_throughput, report, resolve_runs_dir, run_model_name, runs, state_tracking)
from runtime import (BENCH_GRID_NAMES, TRISTATE, GraphedStep, Progress, act_dtype, as_list, autocast_for, check_value,
                     device_name, execution_modes, failure_status, fmt_cell, fmt_time, free_memory, is_oom, key_table,
                     load_dataset, load_split, median, parse_value, peak_flops, read_csv, resolve_device, sync,
                     write_csv, write_meta)

HERE = os.path.dirname(os.path.abspath(__file__))

# sizes of each benchmark, per grid. 'default' is the reproduction's: the same curves as 'exhaustive' with
# fewer points, because a benchmark's time is mostly its per-shape compilation and autotuning, not its timed
# repeats (a throughput point is 20 steps of 5-20 ms after a compilation of 20-60 s), so the repeats stay.
# It keeps every point a figure in results/PERF.md or the README quotes: latency at 128, 1024, 8192 and 32768;
# peak memory and fwd+bwd up to 131072 (65536: the long-context comparison); decode throughput at 1024 and
# 32768 with the doubling to 16384 (the committed run's cap); training at B 64 x T 256 and at 16384 tokens a
# step. 'exhaustive' (--grid=exhaustive) is every point; 'tiny' the CPU tests' sizes.
BENCH_GRIDS = {
    'exhaustive': dict(memory_contexts=[2 ** i for i in range(8, 18)], memory_batches=(1, 4),
                       latency_contexts=[2 ** i for i in range(7, 16)],
                       decode_contexts=[1024, 8192, 32768], decode_batches=[1, 8, 64, 256], decode_max_batch=1 << 17,
                       throughput_shapes=[(64, 256), (16, 1024), (4, 4096), (1, 16384)]),
    'default': dict(memory_contexts=[256, 1024, 4096, 16384, 65536, 131072], memory_batches=(1, 4),
                    latency_contexts=[128, 1024, 8192, 32768],
                    decode_contexts=[1024, 32768], decode_batches=[1, 64, 256], decode_max_batch=1 << 14,
                    throughput_shapes=[(64, 256), (4, 4096), (1, 16384)]),
    'tiny': dict(memory_contexts=[32, 64], memory_batches=(1, 2), latency_contexts=[16, 32, 1024],
                 decode_contexts=[16, 32], decode_batches=[1, 2], decode_max_batch=8,
                 throughput_shapes=[(4, 32), (1, 64)]),
}
GENERATE_SAMPLING = dict(temperature=0.8, top_k=200)                   # sample.py's defaults (a test checks)


def grid_sizes(tiny, grid):
    """The sizes of BENCH_GRIDS for a benchmark call: tiny's, else the named grid's (a ConfigError names the
    valid grids)."""
    check_value('grid', grid, None, BENCH_GRID_NAMES)
    return BENCH_GRIDS['tiny' if tiny else grid]


# ----------------------------------------------------------------------------- small utilities


def available_models(models=None):
    """[(model_type, module)] for the requested model types (default: all of model.MODEL_TYPES),
    skipping, with a printed reason, those whose module does not import or lacks GPTConfig/GPT."""
    names = as_list(models) or list(model.MODEL_TYPES)
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


# ----------------------------------------------------------------------------- params
def params(out='results', tiny=False, device='auto', models=None, model_kw=None):
    """Parameter-matching table: widths, solved d_ff, head dims, total / non-embedding params, % vs vanilla."""
    base_fields = {f.name for f in fields(model.BaseConfig)}  # the skeleton's keys; the rest are the mixer's
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
              f"d_ff {r['d_ff']:>5}  {r['head_dims']}  diff {fmt_cell(r['diff_vs_vanilla_pct'])}%")
        if r['diff_vs_vanilla_pct'] is not None and abs(r['diff_vs_vanilla_pct']) > 1:
            print(f"[params] WARNING: {r['model']} is {r['diff_vs_vanilla_pct']:+.2f}% from vanilla's total params "
                  f"(d_ff cannot absorb the difference: check the mixer's widths)")
    print("[params] how d_ff was solved (model.solve_d_ff):")
    for n in notes:
        print("   ", n)
    cols = ['model', 'n_layer', 'n_head', 'n_embd', 'd_ff', 'd_ff_from', 'block_size', 'pos_emb', 'head_dims',
            'mixer_config', 'total_params', 'non_embedding_params', 'diff_vs_vanilla_pct']
    write_csv(os.path.join(out, 'params.csv'), rows, cols)
    write_meta(out, 'params', resolve_device(device), dict(tiny=tiny, models=models, model_kw=model_kw),
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    with autocast_for(device):
        logits, loss = m(idx, targets)
    assert logits.shape[:2] == (B, T), f"model returned {tuple(logits.shape)} logits for a ({B}, {T}) input"
    loss.backward()
    del logits, loss
    if not cuda:
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def time_fwd_bwd(m, B, T, device, repeats):
    """Median wall time (ms) of `repeats` fwd+bwd passes over a (B, T) batch, synchronised around each."""
    vocab = m.config.vocab_size
    idx, targets = torch.randint(vocab, (B, T), device=device), torch.randint(vocab, (B, T), device=device)
    times = []
    for _ in range(repeats):
        m.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        with autocast_for(device):
            _, loss = m(idx, targets)
        loss.backward()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        del loss
    return median(times)


def memory(out='results', tiny=False, device='auto', models=None, contexts=None, batches=None, warmup=True,
           model_kw=None, repeats=3, grid='default'):
    """Peak training memory vs context (powers of two) at batch 1 and 4, the OOM wall, and decoding-state
    bytes per sequence. Each model is built with block_size = T and fed exactly T tokens (no cropping).
    The same run times fwd+bwd (median of `repeats` passes after the measured one) and reports each
    model's time against vanilla's at the same (B, T): the long-context speed comparison."""
    device = resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    sizes = grid_sizes(tiny, grid)
    contexts = as_list(contexts, int) or sizes['memory_contexts']
    batches = as_list(batches, int) or list(sizes['memory_batches'])
    if not cuda:
        print("[memory] peak memory is read from torch.cuda.max_memory_allocated, which CPU lacks: on CPU the "
              "fwd+bwd still runs at every context (a shape check) but peak_bytes stays empty; "
              "decoding-state bytes are computed as on CUDA")
    rows, avail = [], available_models(models)
    progress = Progress(len(avail) * len(batches) * len(contexts), '[memory]',  # a step's cost ~ its tokens
                        weights=[B * T for _ in avail for B in batches for T in contexts])
    for mt, mod in avail:
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
                    progress.skip(B * T)
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
                    row['status'] = failure_status(e)
                    oom = row['status'] == 'OOM'
                del m
                free_memory(device)  # outside the except block: the traceback no longer pins the tensors
                if oom:
                    wall = T
                rows.append(row)
                progress.update(B * T)
                print(f"[memory] {mt} B={B} T={T}: {row['status']}"
                      + (f", peak {row['peak_gib']:.3f} GiB" if row.get('peak_gib') is not None else '')
                      + f", state {state_bytes[T]:,} B/seq | {progress.text()}", flush=True)
    add_vs_vanilla(rows, 'fwdbwd_ms', 'fwdbwd_vs_vanilla')
    _print_vs_vanilla('memory', rows, 'fwdbwd_vs_vanilla', 'fwd+bwd time')
    cols = ['model', 'batch', 'context', 'tokens', 'status', 'peak_bytes', 'peak_gib', 'param_bytes', 'state_bytes',
            'fwdbwd_ms', 'fwdbwd_vs_vanilla']
    write_csv(os.path.join(out, 'memory.csv'), rows, cols)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    write_meta(out, 'memory', device, dict(tiny=tiny, models=models, contexts=contexts, batches=batches,
                                           warmup=warmup, model_kw=model_kw, repeats=repeats, grid=grid),
               device_total_bytes=total, state_dtype='bfloat16 (KV caches; recurrent states fp32 in the mixers)')
    plot_memory(rows, os.path.join(out, 'memory.png'), total)
    return rows


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


def _time_decode_modes(row, modes, timer, notes):
    """Fill row with timer(mode) -> (prefill ms, decode ms/token) for each decode mode, its column in
    DECODE_COL, and the fastest as decode_mode / decode_ms_per_token / prefill_ms. A graph mode whose
    step can't be captured (model.CaptureError: a failed compilation, an op a graph can't hold, or out of
    memory while capturing, where eager steps may still fit) is skipped with a line in notes, as
    generate() falls back; any other error propagates (out of memory then becomes the row's status)."""
    for mode in modes:
        try:
            p, row[DECODE_COL[mode]] = timer(mode)
        except model.CaptureError as e:
            notes.append(f"{mode} failed: {model.first_line(e, 150)}")
            continue
        if row[DECODE_COL[mode]] < row.get('decode_ms_per_token', float('inf')):
            row.update(decode_mode=mode, prefill_ms=p, decode_ms_per_token=row[DECODE_COL[mode]])


@torch.no_grad()
def time_generation(m, L, n, trials, device, cached=True, graph=False, compile=False, info=None):
    """Batch-1 greedy generation after a random prompt of L tokens: (prefill ms, decode ms per token),
    each the median over `trials` (after one untimed warm-up trial).
    cached: prefill the prompt into a state of capacity L+n, then n steps of
    model(next_token, state=state, last_only=True); with graph=True, n replays of that step captured
    once in a CUDA graph (model.GraphedDecodeStep, what generate() uses on CUDA; the capture happens
    in the warm-up trial), and with compile=True as well, of the step compiled by torch.compile
    (generate(compile=True); compiled in the warm-up trial too). Not cached: every new token runs a
    full forward over the whole sequence so far (prefill ms is then None). info: a dict that gets build_s,
    the seconds building the graphed step took in the warm-up trial (any compilation included)."""
    vocab = m.config.vocab_size
    prompt = torch.randint(vocab, (1, L), device=device)
    assert prompt.shape[1] == L
    state = m.init_state(1, L + n, dtype=act_dtype(device)) if cached else None
    step = lambda tok: m(tok, state=state, last_only=True)[0]  # noqa: E731
    prefill, decode = [], []
    for trial in range(trials + 1):
        sync(device)
        if cached:
            state.reset()  # untimed: zero the buffers, pos = 0
            with autocast_for(device), _Timer(device) as tp:
                logits, _ = m(prompt, state=state, last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if graph and trial == 0:
                t0 = time.perf_counter()
                with autocast_for(device):
                    step = model.GraphedDecodeStep(m, state, compile=compile)
                sync(device)
                if info is not None:
                    info['build_s'] = time.perf_counter() - t0
            with autocast_for(device), _Timer(device) as td:
                for _ in range(n):
                    logits = step(nxt)
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
            assert state.pos == L + n
        else:
            idx = prompt
            with autocast_for(device), _Timer(device) as td:
                for _ in range(n):
                    logits, _ = m(idx, last_only=True)
                    idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            assert idx.shape[1] == L + n
        if trial > 0:  # trial 0 is the warm-up
            prefill.append(tp.ms if cached else None)
            decode.append(td.ms / n)
    return (median(prefill) if cached else None), median(decode)


@torch.no_grad()
def time_generate(m, L, n, trials, device, mode):
    """model.generate() as sample.py calls it (batch 1, GENERATE_SAMPLING, bf16 autocast on CUDA) after a random
    prompt of L tokens, n new tokens, in one decode mode: 'compiled graph' (cuda_graph=True, compile=True),
    'graph' (cuda_graph=True, compile=False) or 'eager' (cuda_graph=False). Returns (ms per token, setup ms,
    prefill ms) from generate's stats, each the median over `trials` calls after one warm-up call (where any
    compilation happens): per token = the n - 1 steps after the first token, each a step and its draw;
    setup = building the graphed step (a capture per call; cast weight copies); prefill = the prompt's
    forward and the first token. A mode generate did not run (a failed capture) raises model.CaptureError."""
    prompt = torch.randint(m.config.vocab_size, (1, L), device=device)
    graph = mode != 'eager'
    res = []
    for trial in range(trials + 1):
        st = {}
        with autocast_for(device):
            y = m.generate(prompt, n, cuda_graph=graph, compile=mode == 'compiled graph', stats=st,
                           **GENERATE_SAMPLING)
        assert y.shape == (1, L + n)
        if st['mode'] != mode:
            raise model.CaptureError(f"generate() ran {st['mode']} ({st['why']})")
        if trial > 0:
            res.append(st)
    return (median([st['ms_per_token'] for st in res]), median([1e3 * st['setup_s'] for st in res]),
            median([1e3 * st['prefill_s'] for st in res]))


LATENCY_COLS = ['model', 'context', 'status', 'prefill_ms', 'decode_ms_per_token', 'decode_tokens_per_s',
                'decode_mode',
                *DECODE_COL.values(), 'generate_ms_per_token', 'generate_mode', 'generate_vs_step',
                *GENERATE_COL.values(), 'generate_setup_ms', 'compiled_build_s', 'nocache_ms_per_token',
                'nocache_over_cache', 'n_decode', 'trials', 'note']


def latency(out='results', tiny=False, device='auto', models=None, contexts=None, n_decode=None, trials=None,
            nocache=True, cuda_graph='auto', compile_decode=True, model_kw=None, grid='default'):
    """Batch-1 prefill time vs prompt length and per-token decode time at those contexts (cache/state),
    plus vanilla's no-cache recompute path in the same run, reported as a ratio.
    Decode modes, each timed in the same run where it applies: 'compiled graph' (the step under
    torch.compile, replayed from a CUDA graph: generate(compile=True)), 'graph' (the eager step replayed
    from a CUDA graph: generate()'s default on CUDA) and 'eager' (one kernel launch at a time). The
    headline decode_ms_per_token is the fastest of them (decode_mode says which).
    Beside the step alone, generate() end to end as users run it (time_generate: sample.py's sampling, the
    draw inside the graph, prefill excluded), in the graph modes on CUDA (eager on CPU):
    generate_ms_per_token is the fastest (generate_mode), generate_vs_step its ratio to decode_ms_per_token.
    compiled_build_s: seconds to build the compiled graphed step in its warm-up trial, compilation included
    where one happened (each model's first context in the process; for the KV-cache models also the second,
    where the capacity becomes a dynamic dimension): what compiling costs, model.COMPILE_COST_S's figure.
    cuda_graph: 'auto' = the graph modes on CUDA for models with static steps; False = eager only.
    compile_decode: also time the compiled graph (compilation happens in the untimed warm-up)."""
    if cuda_graph not in ('auto', False):
        raise ValueError(f"cuda_graph must be 'auto' or False, got {cuda_graph!r}")
    device = resolve_device(device)
    contexts = as_list(contexts, int) or grid_sizes(tiny, grid)['latency_contexts']
    n = n_decode or (4 if tiny else 32)
    trials = trials or (2 if tiny else 5)
    rows, avail = [], available_models(models)
    progress = Progress(len(avail) * len(contexts), '[latency]', weights=[L + n for _ in avail for L in contexts])
    for mt, mod in avail:
        kw = model_kwargs(mt, mod, tiny, model_kw)
        # one model for all contexts; its block_size covers the longest context plus the decoded tokens
        m = build(mt, kw, device, block_size=max(contexts) + n).eval()
        graphs = cuda_graph == 'auto' and torch.device(device).type == 'cuda' and m.static_decode
        modes = (['compiled graph'] if graphs and compile_decode else []) + (['graph'] if graphs else []) + ['eager']
        gen_modes = [md for md in modes if md != 'eager'] or ['eager']  # eager generate() on CUDA: slow, not run
        for L in contexts:
            row, notes, err = dict(model=mt, context=L, n_decode=n, trials=trials), [], None
            try:
                info = {}
                _time_decode_modes(row, modes, lambda mode, m=m, L=L: time_generation(
                    m, L, n, trials, device, graph=mode != 'eager', compile=mode == 'compiled graph',
                    info=info if mode == 'compiled graph' else None), notes)
                row['compiled_build_s'] = info.get('build_s')
                for mode in gen_modes:
                    try:
                        g, setup, _ = time_generate(m, L, n, trials, device, mode)
                    except model.CaptureError as e:
                        notes.append(f"generate() {mode} failed: {model.first_line(e, 150)}")
                        continue
                    row[GENERATE_COL[mode]] = g
                    if g < row.get('generate_ms_per_token', float('inf')):
                        row.update(generate_mode=mode, generate_ms_per_token=g, generate_setup_ms=setup)
                if row.get('generate_ms_per_token'):
                    row['generate_vs_step'] = row['generate_ms_per_token'] / row['decode_ms_per_token']
                for note in notes:
                    print(f"[latency] {mt} L={L}: {note}", flush=True)
                row['decode_tokens_per_s'] = 1e3 / row['decode_ms_per_token']
                if nocache and mt == 'vanilla':
                    _, row['nocache_ms_per_token'] = time_generation(m, L, n, trials, device, cached=False)
                    # against the eager cached steps: the ratio is what the cache saves, not the graph too
                    row['nocache_over_cache'] = row['nocache_ms_per_token'] / row['decode_eager_ms_per_token']
                row['status'] = 'ok'
            except Exception as e:
                err = failure_status(e)
            if err:
                row['status'] = err
                free_memory(device)
            row['note'] = '; '.join(notes)
            rows.append(row)
            progress.update(L + n)
            times = ', '.join(f"{md} {row[DECODE_COL[md]]:.3f}" for md in modes if row.get(DECODE_COL[md]))
            times += ''.join(f", generate() {md} {row[GENERATE_COL[md]]:.3f}" for md in gen_modes
                             if row.get(GENERATE_COL[md]))
            print(f"[latency] {mt} L={L}: " + (f"prefill {row['prefill_ms']:.3f} ms, decode ms/token: {times}"
                  if row['status'] == 'ok' else row['status'])
                  + (f", no-cache {row['nocache_ms_per_token']:.3f} ms/token "
                     f"({row['nocache_over_cache']:.1f}x eager cached)" if 'nocache_ms_per_token' in row else '')
                  + f" | {progress.text()}", flush=True)
        del m
        free_memory(device)
        write_csv(os.path.join(out, 'latency.csv'), rows, LATENCY_COLS)  # after each model: a cut run keeps these
    if not rows:
        write_csv(os.path.join(out, 'latency.csv'), rows, LATENCY_COLS)
    write_meta(out, 'latency', device, dict(tiny=tiny, models=models, contexts=contexts, n_decode=n, trials=trials,
                                            nocache=nocache, cuda_graph=cuda_graph, compile_decode=compile_decode,
                                            model_kw=model_kw, grid=grid), generate_sampling=GENERATE_SAMPLING,
               method=f"batch 1, greedy; prefill = one forward of the L-token prompt into a fresh state of capacity "
                      f"L+n; decode = n={n} one-token steps with the state, ms/token, in each decode mode that "
                      f"applies (compiled graph: torch.compile'd step replayed from a CUDA graph; graph: the eager "
                      f"step replayed from a CUDA graph; eager: launched op by op), decode_mode = the fastest; "
                      f"no-cache = full forward over the whole sequence per token (vanilla); medians of "
                      f"{trials} trials after one warm-up trial (compilation and capture happen in it); "
                      f"{'CUDA events, bf16 autocast' if 'cuda' in device else 'perf_counter, fp32'}. "
                      f"generate_* = model.generate(prompt, {n}, temperature={GENERATE_SAMPLING['temperature']}, "
                      f"top_k={GENERATE_SAMPLING['top_k']}) (sample.py's defaults; top_k >= the vocabulary keeps "
                      f"every token), batch 1, end to end as a user calls it, from its stats: ms per token over the "
                      f"{n - 1} steps after the first token (each step and its draw, in the graph where there is "
                      f"one), the prefill and the graph's setup (generate_setup_ms, a capture per call) excluded; "
                      f"modes compiled graph (compile=True) and graph (compile=False) on CUDA, eager on CPU; "
                      f"generate_mode = the fastest, generate_vs_step = generate_ms_per_token / "
                      f"decode_ms_per_token; medians of {trials} calls after a warm-up call; compiled_build_s = "
                      f"seconds to build the compiled graphed step in its warm-up trial, compilation included "
                      f"where one happened")
    plot_latency(rows, os.path.join(out, 'latency.png'))
    return rows


# ----------------------------------------------------------------------------- decode throughput at batch
@torch.no_grad()
def time_batched_decode(m, B, L, n, repeats, device, mode):
    """ms of each of `repeats` runs of n decoding steps at batch B after a context of L tokens (one untimed run
    first), each step with sample.py's sampling (GENERATE_SAMPLING): on CUDA replays of a GraphedDecodeStep
    with a TokenSampler ('compiled graph': compiled, its batch and capacity dimensions dynamic, so that one
    compilation per model serves every shape; 'graph': not compiled), else eager steps ('eager'). The state
    is not prefilled: it is zeroed and its position set to L, since a step's work does not depend on the values
    it reads (fixed shapes: the KV caches are read whole, masked by position; NSA selects a fixed number of
    blocks), and a prefill of B x L tokens would cost time and memory that are not decoding's. The graph is
    built with restore=False (no copy of the state: at the largest batches it would halve what fits)."""
    state = m.init_state(B, L + n + 4, dtype=act_dtype(device))
    state.pos = L
    sampler = model.TokenSampler(torch.zeros(B, n + 1, dtype=torch.long, device=device), 1,
                                 vocab_size=m.config.vocab_size, **GENERATE_SAMPLING)
    if mode == 'eager':
        step = lambda: sampler(m(sampler.tok, state=state, last_only=True)[0])  # noqa: E731
    else:
        with autocast_for(device):
            step = model.GraphedDecodeStep(m, state, compile=mode == 'compiled graph', sampler=sampler,
                                           restore=False, dynamic=mode == 'compiled graph')
    times = []
    for r in range(repeats + 1):
        state.pos = L
        sampler.reset(1)
        with autocast_for(device), _Timer(device) as t:
            for _ in range(n):
                step()
        if r > 0:
            times.append(t.ms)
    return times


def decode_throughput(out='results', tiny=False, device='auto', models=None, contexts=None, batches=None,
                      n_tokens=None, repeats=None, max_batch=None, compile='auto', model_kw=None, grid='default'):
    """Decoding tokens/s at batch, where a fixed-size state should beat a growing KV cache: for each model and
    context (the grid's: default 1024, 32768; exhaustive 1024, 8192, 32768), the batch grid (default 1, 64, 256;
    exhaustive 1, 8, 64, 256), then the largest batch that
    fits, found by doubling from the largest grid batch that ran (or between it and the first that did not),
    until out of memory, an error, or max_batch (default 2^14, exhaustive 2^17). A shape that fails skips the
    larger grid batches. Each shape: time_batched_decode, n_tokens steps (8) x repeats (3) after one untimed run, one
    CUDA graph per shape; tokens/s = B x n_tokens / the median run, spread_pct = (slowest - fastest) / median
    run. compile='auto': the compiled graph on CUDA (a model whose compilation fails goes on with the
    uncompiled graph, noted). Writes <out>/decode_throughput.csv, its sidecar and a plot."""
    device = resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    sizes = grid_sizes(tiny, grid)
    contexts = as_list(contexts, int) or sizes['decode_contexts']
    batches = sorted(as_list(batches, int) or sizes['decode_batches'])
    n = int(n_tokens or (2 if tiny else 8))
    repeats = int(repeats or (1 if tiny else 3))
    cap = int(max_batch or sizes['decode_max_batch'])
    use_compile = cuda if compile == 'auto' else bool(compile)
    if use_compile and not cuda:
        raise ValueError("compile=True compiles the CUDA-graph decoding step: it needs CUDA; "
                         "use compile='auto' or False")
    rows = []
    for mt, mod in available_models(models):
        kw = model_kwargs(mt, mod, tiny, model_kw)
        m = build(mt, kw, device, block_size=max(contexts) + n + 4).eval()
        graphs = cuda and m.static_decode
        modes = (['compiled graph'] if graphs and use_compile else []) + (['graph'] if graphs else ['eager'])
        for L in contexts:
            ran = {}  # batch -> status

            def measure(B, source):
                row = dict(model=mt, context=L, batch=B, source=source, n_tokens=n, repeats=repeats,
                           state_gib=m.decode_state_bytes(B, L + n + 4, act_dtype(device)) / 2 ** 30)
                while True:
                    row['mode'] = modes[0]
                    try:
                        if cuda:
                            torch.cuda.reset_peak_memory_stats(device)
                        times = sorted(time_batched_decode(m, B, L, n, repeats, device, modes[0]))
                        med = median(times)
                        row.update(status='ok', ms_per_step=med / n, tokens_per_s=B * n * 1e3 / med,
                                   tokens_per_s_min=B * n * 1e3 / times[-1], tokens_per_s_max=B * n * 1e3 / times[0],
                                   spread_pct=100 * (times[-1] - times[0]) / med,
                                   peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None)
                    except Exception as e:
                        if isinstance(e, model.CaptureError) and not is_oom(e) and len(modes) > 1:
                            row['note'] = (f"{modes.pop(0)} failed ({model.first_line(e, 150)}): "
                                           f"{modes[0]} from here on")
                            print(f"[decode_throughput] {mt}: {row['note']}", flush=True)
                            continue
                        row['status'] = failure_status(e)
                    break
                free_memory(device)  # outside the except block: the traceback no longer pins the tensors
                rows.append(row)
                ran[B] = row['status']
                print(f"[decode_throughput] {mt} T={L} B={B}: " + (
                    f"{row['tokens_per_s']:,.0f} tokens/s ({1e3 * row['ms_per_step']:.0f} us/step, spread "
                    f"{row['spread_pct']:.1f}%, {row['mode']})" if row['status'] == 'ok' else row['status']),
                    flush=True)
                return row

            fail = None  # (batch, 'OOM' | 'error') of the first grid batch that did not run
            for B in batches:
                if fail:
                    rows.append(dict(model=mt, context=L, batch=B, source='grid',
                                     status=f'skipped ({fail[1]} at {fail[0]})'))
                    continue
                st = measure(B, 'grid')['status']
                if st != 'ok':
                    fail = (B, 'OOM' if st == 'OOM' else 'error')
            lo = max((B for B, st in ran.items() if st == 'ok'), default=None)
            b = 2 * lo if lo else None
            while b is not None and b <= cap and (fail is None or b < fail[0]):
                st = measure(b, 'doubling')['status']
                if st != 'ok':
                    fail = (b, 'OOM' if st == 'OOM' else 'error')
                    break
                lo, b = b, 2 * b
            if lo:
                best = next(r for r in rows if (r['model'], r['context'], r['batch'], r['status']) == (mt, L, lo, 'ok'))
                best['largest_fitting'] = True
                best['limit'] = f"{fail[1]} at batch {fail[0]}" if fail else f"max_batch {cap} reached"
                print(f"[decode_throughput] {mt} T={L}: largest batch that ran {lo:,} ({best['limit']}): "
                      f"{best['tokens_per_s']:,.0f} tokens/s", flush=True)
        m = None  # (not del: measure() closes over it)
        free_memory(device)
    add_vs_vanilla(rows, 'tokens_per_s', 'vs_vanilla')
    cols = ['model', 'context', 'batch', 'source', 'status', 'mode', 'tokens_per_s', 'vs_vanilla', 'tokens_per_s_min',
            'tokens_per_s_max', 'spread_pct', 'ms_per_step', 'state_gib', 'peak_gib', 'largest_fitting', 'limit',
            'n_tokens', 'repeats', 'note']
    write_csv(os.path.join(out, 'decode_throughput.csv'), rows, cols)
    spreads = [r['spread_pct'] for r in rows if r.get('spread_pct') is not None]
    write_meta(out, 'decode_throughput', device,
               dict(tiny=tiny, models=models, contexts=contexts, batches=batches, n_tokens=n, repeats=repeats,
                    max_batch=cap, compile=compile, model_kw=model_kw, grid=grid),
               method=f"batched decoding with sampling (temperature {GENERATE_SAMPLING['temperature']}, top_k "
                      f"{GENERATE_SAMPLING['top_k']}: sample.py's defaults) at context L: a state of capacity "
                      f"L+{n + 4} "
                      f"at position L, not prefilled (a step's work does not depend on the values it reads), "
                      f"{n} steps a run, {repeats} timed runs after an untimed one, "
                      + ("one CUDA graph per shape (TokenSampler inside, no state copy), the step compiled once per "
                         "model with its batch and capacity dimensions dynamic, CUDA events, bf16 autocast"
                         if cuda else "eager steps, perf_counter, fp32")
                      + f"; tokens/s = batch x {n} / the median run; spread_pct = (slowest - fastest run) / median; "
                        f"vs_vanilla = tokens/s over vanilla's at the same batch and context; the largest batch: "
                        f"doubling from the largest grid batch that ran until out of memory, an error or "
                        f"max_batch (source 'doubling'), marked largest_fitting with its limit",
               largest_spread_pct=max(spreads, default=None))
    plot_decode_throughput(rows, os.path.join(out, 'decode_throughput.png'))
    return rows


def _print_vs_vanilla(tag, rows, col, what):
    """One line per (batch, context): every model's ratio to vanilla, as the targets state them."""
    shapes = {}
    for r in rows:
        if r.get(col):
            shapes.setdefault((r['batch'], r['context']), []).append(f"{r['model']} {r[col]:.2f}x")
    for (B, T), cells in shapes.items():
        print(f"[{tag}] {what} over vanilla's, B={B} T={T}: {', '.join(cells)}", flush=True)


# ----------------------------------------------------------------------------- throughput
def train_step_times(m, B, T, device, iters, warmup, compile=False, reuse=False, cuda_graphs=False):
    """ms of each of `iters` training iterations (fwd+bwd in bf16 autocast on CUDA, grad clip 1.0,
    AdamW step, like train_runner), after `warmup` untimed ones. compile / cuda_graphs: as in
    train_runner (a CUDA graph of forward+backward, runtime.GraphedStep). reuse: the optimizer,
    compiled module and graph of the previous call on m (no re-compilation, no re-capture)."""
    vocab = m.config.vocab_size
    X = torch.randint(vocab, (B, T), device=device)
    Y = torch.randint(vocab, (B, T), device=device)
    if not (reuse and hasattr(m, '_bench_step')):
        opt = m.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(device).type)
        fwd = torch.compile(m) if compile else m
        graphed = None
        if cuda_graphs:
            try:
                graphed = GraphedStep(fwd, m.parameters(), autocast_for(device), X, Y)
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
                with autocast_for(device):
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
    state = m.init_state(1, L + n, dtype=act_dtype(device))
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad(), autocast_for(device):
        m(torch.randint(m.config.vocab_size, (1, L), device=device), state=state)  # prefill
        step = model.GraphedDecodeStep(m, state, compile=compile) if cuda else \
            (lambda t: m(t, state=state, last_only=True)[0])

    @torch.no_grad()
    def run():
        state.pos = L
        with autocast_for(device):
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
    device = resolve_device(device)
    cuda = torch.device(device).type == 'cuda'
    B, T = (batch or (4 if tiny else 64)), (context or (32 if tiny else 256))
    steps = steps or (2 if tiny else 10)
    modes = as_list(modes)
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
                wall = median(times)
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
                row['status'] = failure_status(e)
                print(f"[profile] {mt} ({tag}): {row['status']}", flush=True)
            m = prof = run = None  # drop the model, its optimizer, compiled module and graph before the next one
            free_memory(device)
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
               compile='auto', cuda_graphs='auto', model_kw=None, grid='default'):
    """Training ms/iter, tokens/s and MFU per model at the training shape (B 64 x T 256) and at long
    context with 16384 tokens a step (T = 4096, 16384; the exhaustive grid also 1024)."""
    device = resolve_device(device)
    if shapes is None:
        shapes = grid_sizes(tiny, grid)['throughput_shapes']
    shapes = [tuple(int(v) for v in s) for s in shapes]
    iters = iters or (10 if tiny else 20)  # enough to state a spread (min_ms, max_ms)
    warmup = warmup or (1 if tiny else (10 if compile else 5))
    peak = peak_flops(device)
    print(f"[throughput] peak FLOP/s for MFU on {device_name(device)}: "
          + (f"{peak:.4g}" if peak else "unknown (MFU left empty)"))
    rows, avail = [], available_models(models)
    progress = Progress(len(avail) * len(shapes), '[throughput]')
    for mt, mod in avail:
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
                dt = median(times) / 1e3
                row.update(status='ok', ms_per_iter=dt * 1e3, iters=len(times), min_ms=min(times), max_ms=max(times),
                           tokens_per_s=B * T / dt,
                           mfu=m.estimate_mfu(B, dt, peak, T=T) if peak else None,
                           flops_per_token=m.flops_per_token(T))
            except Exception as e:
                err = failure_status(e)
            if err:
                row['status'] = err
            del m
            free_memory(device)
            rows.append(row)
            progress.update()
            print(f"[throughput] {mt} B={B} T={T}: " + (f"{row['ms_per_iter']:.2f} ms/iter (min {row['min_ms']:.2f}, "
                  f"max {row['max_ms']:.2f} of {row['iters']}), {row['tokens_per_s']:,.0f} tok/s"
                  + (f", MFU {100 * row['mfu']:.1f}%" if row['mfu'] else '')
                  if row['status'] == 'ok' else row['status']) + f" | {progress.text()}", flush=True)
    add_vs_vanilla(rows, 'ms_per_iter', 'vs_vanilla')
    _print_vs_vanilla('throughput', rows, 'vs_vanilla', 'ms/iter')
    cols = ['model', 'batch', 'context', 'tokens_per_iter', 'status', 'ms_per_iter', 'iters', 'min_ms', 'max_ms',
            'vs_vanilla', 'tokens_per_s', 'mfu', 'flops_per_token', 'compile', 'cuda_graphs']
    write_csv(os.path.join(out, 'throughput.csv'), rows, cols)
    write_meta(out, 'throughput', device, dict(tiny=tiny, models=models, shapes=shapes, iters=iters, warmup=warmup,
                                               compile=compile, cuda_graphs=cuda_graphs, model_kw=model_kw, grid=grid),
               peak_flops=peak, method=f"median ms of {iters} iterations after {warmup} warm-up ones (min_ms, max_ms: "
                                       f"their spread); an iteration "
                                       f"= fwd+bwd ({'bf16 autocast' if 'cuda' in device else 'fp32'}), grad clip "
                                       f"1.0, AdamW step; MFU = model.estimate_mfu(B, dt, peak_flops, T)")
    plot_throughput(rows, os.path.join(out, 'throughput.png'))
    return rows


# ----------------------------------------------------------------------------- bake-off


# ----------------------------------------------------------------------------- selfcheck
def selfcheck(out='results', device='auto', models=None):
    """Each model module's selfcheck(device): fla kernels vs the torch reference. Returns the exit code
    (1 on any FAIL). On CPU there is nothing to compare (fla needs CUDA): prints a note, returns 0."""
    device = resolve_device(device)
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
                  f"max_rel_rms={fmt_cell(r.get('max_rel_rms'))} {r.get('detail', '')}", flush=True)
        print(f"[selfcheck] {mt}: {secs:.1f} s (first calls compile and autotune the kernels; cached after)",
              flush=True)
    write_csv(os.path.join(out, 'selfcheck.csv'), rows,
              ['model', 'name', 'ok', 'max_rel_rms', 'model_seconds', 'detail'])
    write_meta(out, 'selfcheck', device, dict(models=models))
    n_fail = sum(not r['ok'] for r in rows)
    print(f"[selfcheck] {len(rows) - n_fail} PASS, {n_fail} FAIL")
    return 1 if n_fail else 0


# ----------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------- all + CLI


def run_all(out='results', tiny=None, device='auto', models=None, preset=None, runs_dir=None, compile='auto',
            model_kw=None, wandb_log=False, wandb_project='attention-bakeoff', grid='default'):
    """params, memory, latency, decode_throughput, throughput, vs_nanogpt (when .nanogpt/ holds karpathy/nanoGPT),
    bakeoff,
    report (what train_runner's sweep calls at its end).
    tiny=None: small benchmark sizes when there is no CUDA. The models benchmarked are those of the
    sweep's run records when there are any (model_kw), else the modules' defaults (or TINY).
    A step that fails is reported and the others still run. Returns {step: 'ok' | 'failed: ...'}."""
    device = resolve_device(device)
    if tiny is None:
        tiny = torch.device(device).type != 'cuda'
    try:
        rdir, preset = resolve_runs_dir(out, preset, runs_dir)
    except ValueError as e:
        rdir = None
        print(f"[bench] no run records: {e}")
    if model_kw is None and rdir is not None:
        model_kw = model_kw_from_runs(rdir) or None
        if model_kw:
            print(f"[bench] benchmarking the models of the run records in {rdir}: {model_kw}")
    grid_sizes(tiny, grid)  # a wrong grid fails before any step runs
    steps = [('params', lambda: params(out, tiny, device, models, model_kw=model_kw)),
             ('memory', lambda: memory(out, tiny, device, models, model_kw=model_kw, grid=grid)),
             ('latency', lambda: latency(out, tiny, device, models, model_kw=model_kw, grid=grid)),
             ('decode_throughput', lambda: decode_throughput(out, tiny, device, models, model_kw=model_kw, grid=grid)),
             ('throughput', lambda: throughput(out, tiny, device, models, compile=compile, model_kw=model_kw,
                                               grid=grid)),
             ('vs_nanogpt', lambda: vs_nanogpt(out, tiny=tiny, device=device, iters=60 if tiny else 500)),
             ('bakeoff', lambda: bakeoff(out, preset, rdir)),
             ('report', lambda: report(out))]
    status, seconds, t_all = {}, {}, time.time()
    for k, (name, fn) in enumerate(steps, 1):
        # each benchmark's lines end with its own progress and ETA; here: where the whole stands
        print(f"===== bench {name} (step {k}/{len(steps)}, {fmt_time(time.time() - t_all)} elapsed) =====", flush=True)
        t_step = time.time()
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
        seconds[name] = round(time.time() - t_step, 1)
        print(f"[bench] {name}: {status[name].split(':')[0]} in {fmt_time(seconds[name])}", flush=True)
    if wandb_log:
        _wandb_log(out, wandb_project, f'bench-{preset or os.path.basename(os.path.normpath(out))}')
    print(f"[bench] seconds {json.dumps(seconds)}")  # each step's wall time (train_runner's reproduction.json)
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
             model_kw=None, wandb_log=False, grid='default'):
    status = run_all(out, tiny, device, models, preset, runs_dir, compile, model_kw, wandb_log, grid=grid)
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
    check_value('compile', compile, None, TRISTATE)  # bool('no') would be True
    device = resolve_device(device)
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
        # ours in a process of its own too, as nanoGPT's (bench does not import train_runner)
        ours_cmd = [sys.executable, os.path.join(HERE, 'train_runner.py'),
                    *(f'--{k}={v}' for k, v in {**common, 'model_type': 'vanilla', 'out_dir': f'{tmp}/ours',
                                                 'dropout': 0.2}.items())]
        print(f"[vs_nanogpt] ours: {' '.join(ours_cmd[1:])}", flush=True)
        r = subprocess.run(ours_cmd, cwd=HERE, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"train_runner.py failed (exit {r.returncode}): {r.stderr[-2000:]}")
        with open(f'{tmp}/ours/metrics.jsonl') as f:
            ours = [row['ms_per_iter'] for row in map(json.loads, f) if row['kind'] == 'train']
    if len(theirs) <= skip or len(ours) <= skip:
        raise RuntimeError(f"too few timed iterations (nanoGPT {len(theirs)}, ours {len(ours)}) for skip={skip}")
    rows = []
    for impl, ts in (('nanoGPT', theirs[skip:]), ('this repo (vanilla)', ours[skip:])):
        ts = sorted(ts)
        rows.append(dict(impl=impl, iters=len(ts), median_ms=median(ts), p10_ms=ts[len(ts) // 10],
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
    device = resolve_device(device)
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
    for mt, mod in available_models(as_list(models)):
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
    plot_scaling(curves, gpus, os.path.join(out, 'scaling_loss.png'))
    return rows


# ----------------------------------------------------------------------------------------------
# length generalisation: the bake-off's checkpoints past their training context

LENGTH_CONTEXTS = [256, 512, 1024, 2048, 4096]
LENGTH_COLS = ['model', 'context', 'position_bucket', 'loss', 'n_tokens', 'mode', 'seeds']


def extended(run_model_config, state_dict, context, device):
    """The trained model at `context` tokens: (model, mode). A model without a learned position table runs the
    whole context ('full': built with block_size = context, the trained weights loaded strictly, so any weight
    whose shape depends on block_size is an error, never a silent change); one with learned positions keeps its
    block_size and slides it ('sliding <block_size>')."""
    mc = dict(run_model_config)
    mod = model.get_model_module(mc['model_type'])
    learned = mc.get('pos_emb', 'learned') == 'learned'
    if not learned:
        mc['block_size'] = max(context, mc['block_size'])
    m = mod.GPT(mod.GPTConfig(**mc))
    m.load_state_dict(state_dict)
    m.to(device).eval()
    return m, (f"sliding {mc['block_size']}" if learned and context > mc['block_size'] else 'full')


@torch.no_grad()
def position_losses(m, data, context, n_windows, batch, device, autocast):
    """Summed next-token loss per position (context,) over n_windows windows data[s : s + context + 1], s = 0,
    context, 2 context, ... (float64, on the CPU). Past block_size a model with learned positions predicts each
    token from the block_size tokens before it (nanoGPT's sliding window, one forward per position, the last
    logit of each), so every position of the context is scored, none cropped; the rest see the whole window."""
    bs = m.config.block_size
    sums = torch.zeros(context, dtype=torch.float64)
    starts = torch.arange(n_windows) * context
    win = data[starts[:, None] + torch.arange(context + 1)].to(device)  # (W, context + 1)
    x_all, y_all = win[:, :-1], win[:, 1:]

    def nll(x, y):
        with autocast:
            logits = m(x)[0]
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction='none').double().sum(0).cpu()

    head = min(context, bs)  # positions the model sees from the window's start
    for i in range(0, n_windows, batch):
        sums[:head] += nll(x_all[i:i + batch, :head], y_all[i:i + batch, :head])
    if context > bs:  # learned positions only: extended() built the others at block_size >= context
        for w in range(n_windows):
            subs = x_all[w].unfold(0, bs, 1)[1:]  # (context - bs, bs): the window ending at each position >= bs
            for j in range(0, len(subs), batch * 8):
                xs = subs[j:j + batch * 8]
                with autocast:
                    logits = m(xs, last_only=True)[0][:, -1].float()
                ys = y_all[w, bs + j:bs + j + len(xs)]
                sums[bs + j:bs + j + len(xs)] += F.cross_entropy(logits, ys, reduction='none').double().cpu()
    return sums


def bucket_rows(name, context, sums, n_windows, bucket, mode, seeds=1):
    """Rows of (model, context, position_bucket 'a-b', mean loss, n_tokens, mode, seeds) from per-position loss
    sums; n_windows counts every seed's windows."""
    rows = []
    for a in range(0, context, bucket):
        b = min(a + bucket, context)
        n = n_windows * (b - a)
        rows.append(dict(model=name, context=context, position_bucket=f"{a}-{b - 1}",
                         loss=float(sums[a:b].sum()) / n, n_tokens=n, mode=mode, seeds=seeds))
    return rows


def length_gen(out='results/full', runs_dir=None, contexts=None, split='test', bucket=256, max_windows=None,
               batch_size=8, device='auto', models=None, preset=None):
    """Loss against position past the training context (<out>/length_generalization.csv, .png, .meta.json):
    each model's and variant's checkpoints (ckpt_best.pt of every seed at the bake-off's chosen (lr, dropout),
    report.bakeoff_cells; a seed whose checkpoint is absent, trained elsewhere, is left out and named in the
    .meta.json) evaluated on the dataset's `split` at each context (256 .. 4096), the
    next-token loss per position bucket (0-255, 256-511, ...) over non-overlapping windows of the split (all
    that fit, or max_windows), pooled over seeds (n_tokens counts them). Models without learned positions
    (DeltaNet, Gated DeltaProduct, NSA with its RoPE, a RoPE or no-position vanilla) run the whole context;
    vanilla with learned positions slides its block_size window (mode 'sliding 256'): its reference line.
    Checkpoints are not committed: run it where the sweep trained them."""
    device = resolve_device(device)
    contexts = as_list(contexts, int) if contexts is not None else LENGTH_CONTEXTS
    if bucket < 1 or batch_size < 1 or any(c < 1 for c in contexts):
        raise ValueError(f"length_gen: contexts, bucket and batch_size must be >= 1, got {contexts}, {bucket}, "
                         f"{batch_size}")
    rdir, preset = resolve_runs_dir(out, preset, runs_dir)
    runs, _ = load_runs(rdir)
    if any(has_test_split(r) for r in runs):  # the bake-off's protocol; older records measured another val split
        runs = [r for r in runs if has_test_split(r)]
    if models is not None:
        want = as_list(models, str)
        runs = [r for r in runs if r['summary']['model_type'] in want or run_model_name(r) in want]
    if not runs:
        raise ValueError(f"length_gen: no finished runs under {rdir}"
                         + (f" of models {models}" if models else ''))
    # each model and variant at the bake-off's chosen (lr, dropout), from validation alone (report.bakeoff_cells)
    names, cells, _ = bakeoff_cells(runs)
    picked, absent = {}, {}
    for name in names:
        cell, rs = cells[name]
        ckpt = {r['name']: os.path.join(rdir, r['name'], 'ckpt_best.pt') for r in rs}
        absent[name] = [n for n, c in ckpt.items() if not os.path.exists(c)]
        have = [r for r in rs if r['name'] not in absent[name]]
        if absent[name]:  # a seed trained on another machine, or by an earlier sweep there: no checkpoint here
            print(f"[length_gen] {name}: no checkpoint for {', '.join(absent[name])}"
                  + ("; scoring the other seeds" if have else "; skipped"))
        if have:
            picked[name] = (cell, have, [ckpt[r['name']] for r in have])
    if not picked:
        raise FileNotFoundError(f"length_gen: none of the chosen runs under {rdir} has its checkpoint; they are not "
                                f"committed: run where the sweep trained them")
    runs = [r for _, rs, _ in picked.values() for r in rs]
    datasets = {r['config']['config']['dataset'] for r in runs}
    if len(datasets) != 1:
        raise ValueError(f"length_gen: the runs trained on several datasets {sorted(datasets)}")
    data = load_split(datasets.pop(), split)
    autocast = autocast_for(device)
    fit = {c: (len(data) - 1) // c for c in contexts}
    short = [c for c, n in fit.items() if n < 1]
    if short:
        raise ValueError(f"length_gen: the {split} split has {len(data):,} tokens: no window of {short} fits")
    n_win = {c: min(n, max_windows) if max_windows else n for c, n in fit.items()}
    units = [(mt, ck, c) for mt, (_, _, cks) in picked.items() for ck in cks for c in contexts]
    progress = Progress(len(units), 'length_gen', weights=[c * n_win[c] for _, _, c in units], bar=True)
    rows = []
    for mt in picked:  # table order (report.bakeoff_cells)
        (lr, dropout), rs, ckpts = picked[mt]
        for c in contexts:
            sums, mode = torch.zeros(c, dtype=torch.float64), None
            for ck in ckpts:
                state = torch.load(ck, map_location='cpu', weights_only=False)
                m, mode = extended(state['model_config'], state['model'], c, device)
                sums += position_losses(m, data, c, n_win[c], batch_size, device, autocast)
                progress.update(c * n_win[c])
                del m, state
            rows += bucket_rows(mt, c, sums, n_win[c] * len(ckpts), bucket, mode, len(ckpts))
            print(f"[length_gen] {mt} (lr {lr:g}, dropout {dropout:g}, {len(ckpts)} seed(s)) at context {c} "
                  f"({mode}, {n_win[c]} windows): "
                  f"loss {float(sums.sum()) / (c * n_win[c] * len(ckpts)):.4f} | {progress.text()}", flush=True)
    progress.close()
    write_csv(os.path.join(out, 'length_generalization.csv'), rows, LENGTH_COLS)
    plot_length_gen(rows, os.path.join(out, 'length_generalization.png'))
    write_meta(out, 'length_generalization', device, dict(contexts=contexts, split=split, bucket=bucket,
                                                         max_windows=max_windows, batch_size=batch_size),
               runs_dir=rdir, checkpoints={mt: [os.path.relpath(c, rdir) for c in v[2]] for mt, v in picked.items()},
               cells={mt: {'lr': v[0][0], 'dropout': v[0][1]} for mt, v in picked.items()},
               without_checkpoint={mt: v for mt, v in absent.items() if v})
    return rows


COMMANDS = {**{f.__name__: f for f in (params, memory, latency, decode_throughput, throughput, bakeoff, report,
                                        selfcheck, runs, vs_nanogpt, profile, scaling, mqar, state_tracking,
                                        length_gen)},
            'all': _all_cli}
all = run_all  # bench.all(...) as in the docs (shadows the builtin in this module only; bench never uses it)


# the meaning of every sub-command's keys: 'key' for each sub-command that has it, 'command.key' where one
# means something else by it. `python bench.py <sub-command> --help` and docs/configuration.md are made from
# this table; a test checks that it covers every key of every sub-command.
HELP = {
    'out': "output folder: <out>/<name>.csv, <name>.meta.json and plots",
    'tiny': "each module's TINY config and small sizes (CPU tests)",
    'device': "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'",
    'models': "comma-separated model types (None: every one in model.MODEL_TYPES whose module imports)",
    'model_kw': "{model_type: GPTConfig kwargs} of the models measured (None: the modules' defaults, or TINY)",
    'compile': "torch.compile: 'auto' (on for CUDA), True, False",
    'cuda_graphs': "capture the training step in a CUDA graph: 'auto' (on for CUDA), True, False",
    'preset': "the sweep preset whose run records to use (None: the only one there)",
    'runs_dir': "folder of the run folders (None: <out>/runs, or <out>/runs/<preset>)",
    'readme': "also replace the README's generated block with the table",
    'shapes': "training shapes (B, T) (None: the grid's: default (64, 256), (4, 4096), (1, 16384); exhaustive also "
              "(16, 1024); tiny (4, 32), (1, 64))",
    'iters': "timed iterations (None: 20; tiny: 2)",
    'grid': "the sizes when contexts, shapes or batches are not given: 'default' (the reproduction's points, "
            "BENCH_GRIDS) or 'exhaustive' (every point); tiny overrides both",
    'memory.contexts': "contexts T (None: the grid's: default 256, 1024, 4096, 16384, 65536, 131072; exhaustive "
                       "256 -> 131072 in powers of two; tiny: 32, 64)",
    'memory.batches': "batch sizes (None: 1, 4; tiny: 1, 2)",
    'memory.warmup': "CUDA: one pass before the measured one (the first autotunes kernels, with extra buffers)",
    'memory.repeats': "fwd+bwd passes timed after the measured one (their median); 0: memory only",
    'latency.contexts': "prompt lengths (None: the grid's: default 128, 1024, 8192, 32768; exhaustive 128 -> 32768 "
                        "in powers of two; tiny: 16, 32, 1024)",
    'latency.n_decode': "tokens decoded per timing (None: 32; tiny: 4)",
    'latency.trials': "timings per context, the first a warm-up (None: 5; tiny: 2)",
    'latency.nocache': "also time vanilla's no-cache path (the whole context recomputed per token)",
    'latency.cuda_graph': "'auto': also the CUDA-graph decode modes on CUDA; False: eager steps only",
    'latency.compile_decode': "also time the torch.compile'd graphed decode step (compiled in the warm-up)",
    'decode_throughput.contexts': "contexts the state or KV cache holds (None: the grid's: default 1024, 32768; "
                                  "exhaustive 1024, 8192, 32768; tiny: 16, 32)",
    'decode_throughput.batches': "the batch grid (None: default 1, 64, 256; exhaustive 1, 8, 64, 256; tiny: 1, 2)",
    'decode_throughput.n_tokens': "tokens decoded per timed run (None: 8; tiny: 2)",
    'decode_throughput.repeats': "timed runs per shape after one untimed (None: 3; tiny: 1); their median",
    'decode_throughput.max_batch': "where doubling the batch stops looking for the largest that fits (None: default "
                                   "2^14, exhaustive 2^17; tiny: 8)",
    'throughput.warmup': "untimed iterations first (None: 10 compiled, 5 eager; tiny: 1)",
    'profile.batch': "batch size of the training step (None: 64; tiny: 4)",
    'profile.context': "context of the training step, or the decode modes' prompt (None: 256 / 1024; tiny: 32)",
    'profile.steps': "steps timed and profiled (None: 10; tiny: 2)",
    'profile.modes': "comma-separated: eager, compiled, train, decode, decode_compiled",
    'profile.top': "kernels listed per table",
    'runs.runs_dir': "folder searched (recursively) for finished runs",
    'vs_nanogpt.nanogpt_dir': "karpathy/nanoGPT's checkout (None: .nanogpt/)",
    'vs_nanogpt.iters': "training iterations of each",
    'vs_nanogpt.skip': "first iterations left out of the median (compilation, autotuning)",
    'scaling.models': "comma-separated model types",
    'scaling.gpus': "processes (GPUs) of the DDP run, >= 2",
    'scaling.iters': "training iterations of each run (None: 300; tiny: 20)",
    'scaling.shapes': "per-process micro-batches (B, T) (None: (32, 256), (1, 8192); tiny: (8, 32))",
    'all.tiny': "small sizes (None: when there is no CUDA)",
    'mqar.out': "the MQAR grid's folder: its run records in <out>/runs/; writes mqar.csv, mqar_best.csv, plots, REPORT.md",
    'mqar.runs_dir': "folder of the run folders (None: <out>/runs)",
    'state_tracking.out': "the state-tracking grid's folder: its run records in <out>/runs/; writes "
                          "state_tracking.csv, its plot, REPORT.md",
    'state_tracking.runs_dir': "folder of the run folders (None: <out>/runs)",
    'length_gen.out': "the bake-off's folder: writes length_generalization.csv, .png and .meta.json there",
    'length_gen.contexts': "contexts evaluated (None: 256, 512, 1024, 2048, 4096)",
    'length_gen.split': "the dataset split evaluated (data/<dataset>/<split>.bin); a missing one is an error naming "
                        "the splits present",
    'length_gen.bucket': "positions per loss bucket (0-255, 256-511, ...)",
    'length_gen.max_windows': "non-overlapping windows per context (None: every one that fits in the split)",
    'length_gen.batch_size': "windows per forward (the sliding path: 8x this many sub-windows)",
    'length_gen.models': "comma-separated model types (None: every model of the runs)",
    'all.wandb_log': "also log the tables and plots to Weights & Biases (needs wandb)",
}
# keys that take only these values (any string passes where the default is 'auto', and bool('no') is True)
CHOICES = {'compile': TRISTATE, 'cuda_graphs': TRISTATE, 'tiny': (None, True, False), 'cuda_graph': ('auto', False),
           'grid': BENCH_GRID_NAMES}


def key_help(command, key):
    return HELP.get(f'{command}.{key}', HELP.get(key))


def command_help(command):
    """`python bench.py <command> --help`: what it does (its docstring) and its keys with defaults and meanings."""
    fn = COMMANDS[command]
    target = run_all if command == 'all' else fn
    rows = [(k, p.default, key_help(command, k)) for k, p in inspect.signature(fn).parameters.items()]
    return '\n'.join([f"python bench.py {command} [--key=value ...]", '',
                      inspect.cleandoc(target.__doc__ or ''), '', 'keys:', key_table(rows)])


def check_args(command, kwargs):
    """Each --key=value against its default: a bool key takes only booleans, a number key only numbers, the
    tri-state keys only True/False/'auto' (a ConfigError names what fits)."""
    params = inspect.signature(COMMANDS[command]).parameters
    for k, v in kwargs.items():
        default = params[k].default
        if k in CHOICES:
            check_value(k, v, default, CHOICES[k])
        elif isinstance(default, (bool, int, float)) and not (v is None and default is None):
            kwargs[k] = check_value(k, v, default)
    return kwargs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"usage: python bench.py <{'|'.join(COMMANDS)}> [--key=value ...]")
        return 2 if argv and argv[0] not in ('-h', '--help') else 0
    if '-h' in argv[1:] or '--help' in argv[1:]:
        print(command_help(argv[0]))
        return 0
    fn = COMMANDS[argv[0]]
    valid = list(inspect.signature(fn).parameters)
    kwargs = {}
    for arg in argv[1:]:
        if not arg.startswith('--') or '=' not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --key=value; valid keys for {argv[0]}: {', '.join(valid)}")
        k, v = arg[2:].split('=', 1)
        if k not in valid:
            raise SystemExit(f"unknown key {k!r} for {argv[0]}; valid keys: {', '.join(valid)}")
        kwargs[k] = parse_value(v)
    try:
        rc = fn(**check_args(argv[0], kwargs))
    except ValueError as e:  # bad input (an unknown model, preset...): the message names the valid choices
        raise SystemExit(f"error: {e}")
    return rc if isinstance(rc, int) else 0


if __name__ == '__main__':
    sys.exit(main())
