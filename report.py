"""
The report: markdown tables, plots, REPORT.md and the README's generated blocks, all rendered from the result
files (CSV, JSON, run records) that bench.py and train_runner.py write. Nothing here measures anything, so
everything here is deterministic given those files: `python bench.py report` and `bench.py bakeoff` rebuild
their outputs byte for byte.
"""

import json
import math
import os
import re
from dataclasses import fields

import model
from runtime import read_csv, write_csv, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


DECODE_COL = {'compiled graph': 'decode_compiled_ms_per_token', 'graph': 'decode_graph_ms_per_token',
               'eager': 'decode_eager_ms_per_token'}                     # latency's decode modes
GENERATE_COL = {'compiled graph': 'generate_compiled_ms_per_token', 'graph': 'generate_graph_ms_per_token',
                'eager': 'generate_eager_ms_per_token'}                  # generate() end to end, per mode


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def savefig(fig, path):
    # no 'Software' (matplotlib version) in the PNG: plots depend on their data only
    fig.savefig(path, dpi=110, metadata={'Software': None})
    pyplot().close(fig)
    print(f"[bench] wrote {path}")


def color_of(mt):
    order = list(model.MODEL_TYPES)
    return f'C{order.index(mt)}' if mt in order else 'C7'


def plot_memory(rows, path, device_total_bytes=None):
    plt = pyplot()
    if _peak_needs_cuda(rows):  # no peak-memory counter (CPU): no memory-wall panel
        fig, ax2 = plt.subplots(figsize=(7, 4.5))
        fig.text(0.01, 0.01, 'peak training memory and the OOM wall: needs CUDA', fontsize=8, color='0.35')
        _plot_state_bytes(ax2, rows)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        savefig(fig, path)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    measured = False
    for mt in dict.fromkeys(r['model'] for r in rows):
        for B, ls in zip(sorted({int(r['batch']) for r in rows if r['model'] == mt}), ['-', '--', ':', '-.']):
            rs = [r for r in rows if r['model'] == mt and int(r['batch']) == B]
            pts = [(int(r['context']), float(r['peak_bytes']) / 2 ** 30) for r in rs
                   if r['status'] == 'ok' and r.get('peak_bytes') not in (None, '')]
            if pts:
                measured = True
                ax1.plot(*zip(*pts), ls, marker='o', ms=3, color=color_of(mt), label=f'{mt} B={B}')
            for r in rs:
                if r['status'] == 'OOM':
                    y = device_total_bytes / 2 ** 30 if device_total_bytes else (pts[-1][1] if pts else 1)
                    ax1.plot([int(r['context'])], [y], 'x', ms=10, mew=2, color=color_of(mt))
                    ax1.annotate('OOM', (int(r['context']), y), textcoords='offset points', xytext=(4, 4),
                                 fontsize=7, color=color_of(mt))
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
    _plot_state_bytes(ax2, rows)
    fig.tight_layout()
    savefig(fig, path)


def _plot_state_bytes(ax2, rows):
    for mt in dict.fromkeys(r['model'] for r in rows):
        pts = sorted({(int(r['context']), int(r['state_bytes'])) for r in rows if r['model'] == mt})
        ax2.plot(*zip(*pts), marker='o', ms=3, color=color_of(mt), label=mt)
    ax2.set(xscale='log', yscale='log', xlabel='context length T (tokens)', ylabel='bytes per sequence',
            title='decoding state (KV cache vs recurrent state)')
    ax2.set_xscale('log', base=2)
    ax2.legend(fontsize=7)


def _peak_needs_cuda(rows):
    """memory.csv rows of a device without a peak-memory counter: nothing measured, no OOM wall."""
    return (any(r['status'].startswith('ok (peak not measured') for r in rows)
            and not any(r['status'] in ('ok', 'OOM') for r in rows))


def add_vs_vanilla(rows, value, col):
    """r[col] = r[value] / vanilla's r[value] at the same batch and context, for rows of one command (one
    run: the ratios the speed targets are stated in). Rows read back from a CSV work too (strings)."""
    key = lambda r: (str(r['batch']), str(r['context']))
    ref = {key(r): _num(r, value) for r in rows if r['model'] == 'vanilla' and _num(r, value)}
    for r in rows:
        if _num(r, value) and key(r) in ref:
            r[col] = _num(r, value) / ref[key(r)]
    return rows


def _decode_mode(r):
    """A latency.csv row's decode mode; rows written before decode_mode existed say decode_cuda_graph."""
    return r.get('decode_mode') or ('graph' if r.get('decode_cuda_graph') in (True, 'True') else 'eager')


def _num(r, k):
    v = r.get(k)
    return None if v in (None, '') else float(v)


def plot_latency(rows, path):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw=dict(width_ratios=[1, 1.25]))
    for mt in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == mt and r['status'] == 'ok']
        if not rs:
            continue
        L = [int(r['context']) for r in rs]
        ax1.plot(L, [_num(r, 'prefill_ms') for r in rs], marker='o', ms=3, color=color_of(mt), label=mt)
        modes = {_decode_mode(r) for r in rs}
        ax2.plot(L, [_num(r, 'decode_ms_per_token') for r in rs], marker='o', ms=3, color=color_of(mt),
                 label=f"{mt} (cache/state, {modes.pop() if len(modes) == 1 else 'fastest mode'})")
        for col, style, what in (('decode_graph_ms_per_token', '-.', 'graph of the eager step'),
                                 ('decode_eager_ms_per_token', ':', 'eager steps')):
            pts = [(int(r['context']), _num(r, col)) for r in rs if _num(r, col) is not None
                   and _num(r, col) != _num(r, 'decode_ms_per_token')]
            if pts:
                ax2.plot(*zip(*pts), style, marker='.', ms=3, color=color_of(mt), label=f'{mt} ({what})')
        gen = [(int(r['context']), _num(r, 'generate_ms_per_token')) for r in rs
               if _num(r, 'generate_ms_per_token') is not None]
        if gen:
            ax2.plot(*zip(*gen), '--', marker='s', ms=3, color=color_of(mt),
                     label=f'{mt} (generate(), sampling included)')
        nc = [(int(r['context']), _num(r, 'nocache_ms_per_token')) for r in rs
              if _num(r, 'nocache_ms_per_token') is not None]
        if nc:
            ax2.plot(*zip(*nc), '--', marker='x', ms=4, color=color_of(mt), label=f'{mt} (no cache: recompute)')
    ax1.set(xscale='log', yscale='log', xlabel='prompt length (tokens)', ylabel='prefill time (ms)',
            title='prefill, batch 1')
    ax2.set(xscale='log', yscale='log', xlabel='context length (tokens)', ylabel='ms per generated token',
            title='decode, batch 1')
    for ax in (ax1, ax2):
        ax.set_xscale('log', base=2)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))  # outside: a dozen series
    fig.tight_layout()
    savefig(fig, path)


def plot_decode_throughput(rows, path):
    """decode_throughput.png: tokens/s against batch, a line per model, a panel per context; a star marks the
    largest batch that ran, an x the batch that ran out of memory."""
    plt = pyplot()
    contexts = sorted({int(r['context']) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(contexts)), figsize=(5 * max(1, len(contexts)), 4.2), squeeze=False,
                             sharey=True)
    for ax, L in zip(axes[0], contexts):
        for mt in dict.fromkeys(r['model'] for r in rows):
            rs = sorted((r for r in rows if r['model'] == mt and int(r['context']) == L), key=lambda r: int(r['batch']))
            ok = [r for r in rs if r['status'] == 'ok']
            if ok:
                ax.plot([int(r['batch']) for r in ok], [_num(r, 'tokens_per_s') for r in ok], marker='o', ms=3,
                        color=color_of(mt), label=mt)
            for r in ok:
                if r.get('largest_fitting') in (True, 'True'):
                    ax.plot([int(r['batch'])], [_num(r, 'tokens_per_s')], '*', ms=11, color=color_of(mt))
            for r in rs:
                if r['status'] == 'OOM' and ok:
                    ax.plot([int(r['batch'])], [_num(ok[-1], 'tokens_per_s')], 'x', ms=8, mew=2, color=color_of(mt))
        ax.set(xscale='log', yscale='log', xlabel='batch (sequences decoded together)', title=f'context {L:,}')
        ax.set_xscale('log', base=2)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('decoded tokens / s (all sequences)')
    fig.suptitle('decode throughput (star: largest batch that ran; x: out of memory)', fontsize=10)
    fig.tight_layout()
    savefig(fig, path)


def overtakes(rows):
    """Lines saying, for each context and each model other than vanilla, where its decoding tokens/s overtakes
    vanilla's (the batches where it is higher, same context and batch), and how the two compare at the
    largest batch each could run; from decode_throughput rows (CSV strings or numbers)."""
    ok = [r for r in rows if r['status'] == 'ok']
    tps = {(r['model'], int(r['context']), int(r['batch'])): _num(r, 'tokens_per_s') for r in ok}
    largest = {(r['model'], int(r['context'])): int(r['batch']) for r in ok
               if r.get('largest_fitting') in (True, 'True')}
    lines = []
    for L in sorted({int(r['context']) for r in ok}):
        for mt in dict.fromkeys(r['model'] for r in ok):
            if mt == 'vanilla':
                continue
            both = sorted(B for (m, c, B) in tps if m == mt and c == L and ('vanilla', L, B) in tps)
            if not both:
                continue
            faster = [B for B in both if tps[(mt, L, B)] > tps[('vanilla', L, B)]]
            if not faster:
                where = f"slower than vanilla at every batch both ran ({', '.join(map(str, both))})"
            elif faster == [B for B in both if B >= faster[0]]:
                where = (f"overtakes vanilla from batch {faster[0]} on ({tps[(mt, L, faster[0])]:,.0f} against "
                         f"{tps[('vanilla', L, faster[0])]:,.0f} tokens/s there)" if faster[0] > both[0] else
                         f"faster than vanilla at every batch both ran ({', '.join(map(str, both))})")
            else:
                where = f"faster than vanilla at batch {', '.join(map(str, faster))} of {', '.join(map(str, both))}"
            line = f"- context {L:,}: {mt} is {where}" if not where.startswith('overtakes') else \
                f"- context {L:,}: {mt} {where}"
            bm, bv = largest.get((mt, L)), largest.get(('vanilla', L))
            if bm and bv:
                a, b = tps[(mt, L, bm)], tps[('vanilla', L, bv)]
                line += (f"; at the largest batch each ran ({mt} {bm:,}, vanilla {bv:,}): {a:,.0f} against "
                         f"{b:,.0f} tokens/s ({a / b:.2f}x)")
            lines.append(line + '.')
    return lines


def plot_throughput(rows, path):
    plt = pyplot()
    shapes = list(dict.fromkeys((int(r['batch']), int(r['context'])) for r in rows))
    mts = list(dict.fromkeys(r['model'] for r in rows))
    # MFU needs the device's peak FLOP/s, known (or measured) for CUDA devices only: no panel without it
    has_mfu = any(_num(r, 'mfu') for r in rows if r['status'] == 'ok')
    fig, axes = plt.subplots(1, 2 if has_mfu else 1, figsize=(12, 4.5) if has_mfu else (7, 4.5), squeeze=False)
    ax1, ax2 = axes[0][0], axes[0][1] if has_mfu else None
    w = 0.8 / max(1, len(mts))
    spread = any(_num(r, 'min_ms') for r in rows)  # files since the spread is measured: min-max as error bars
    for i, mt in enumerate(mts):
        tps, mfu, err = [], [], [[], []]
        for B, T in shapes:
            r = next((r for r in rows if r['model'] == mt and (int(r['batch']), int(r['context'])) == (B, T)
                      and r['status'] == 'ok'), None)
            tps.append(_num(r, 'tokens_per_s') if r else 0)
            mfu.append(100 * _num(r, 'mfu') if r and _num(r, 'mfu') is not None else 0)
            ok = r is not None and _num(r, 'min_ms') and _num(r, 'max_ms')
            err[0].append(tps[-1] - B * T * 1e3 / _num(r, 'max_ms') if ok else 0)
            err[1].append(B * T * 1e3 / _num(r, 'min_ms') - tps[-1] if ok else 0)
        x = [j + i * w for j in range(len(shapes))]
        ax1.bar(x, tps, w, color=color_of(mt), label=mt, **(dict(yerr=err, capsize=2) if spread else {}))
        if ax2 is not None:
            ax2.bar(x, mfu, w, color=color_of(mt), label=mt)
    if not has_mfu:
        fig.text(0.01, 0.01, 'MFU (model FLOPs utilisation): needs CUDA (a known peak FLOP/s)', fontsize=8,
                 color='0.35')
    labels = [f'B={B}\nT={T}' for B, T in shapes]
    for ax, yl in ((ax1, 'training tokens / s'), (ax2, 'MFU (%)')):
        if ax is None:
            continue
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))], labels)
        ax.set(ylabel=yl)
        ax.legend(fontsize=7)
    ax1.set_title('training throughput (missing bar = OOM / error' + ('; bars: min-max)' if spread else ')'))
    if ax2 is not None:
        ax2.set_title('model FLOPs utilisation')
    fig.tight_layout(rect=(0, 0 if has_mfu else 0.04, 1, 1))
    savefig(fig, path)


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


def resolve_runs_dir(out, preset, runs_dir):
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
    res, rows = {}, read_csv(path)
    if _peak_needs_cuda(rows):  # the bake-off's columns (B=1, B=4) say why they are empty
        return {mt: {1: 'needs CUDA', 4: 'needs CUDA'} for mt in dict.fromkeys(r['model'] for r in rows)}
    for r in rows:
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
    return {r['model']: (float(r['decode_ms_per_token']), _decode_mode(r),
                         float(r['generate_ms_per_token']) if r.get('generate_ms_per_token') else None,
                         r.get('generate_mode') or '-')
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


def has_test_split(run):
    """Whether a run record carries the test split's losses (recorded since the 90/5/5 split)."""
    return run['summary'].get('test_loss') is not None


def run_model_name(run):
    """The model's name as the sweep wrote it (a variant's, e.g. vanilla+attn_dropout=0), else its model type."""
    return run['summary'].get('model') or run['summary']['model_type']


def _dropout(run):
    return float(run['summary'].get('dropout', run['config']['config'].get('dropout', float('nan'))))


def _name_order(run_or_name, types=None):
    name = run_or_name if isinstance(run_or_name, str) else run_model_name(run_or_name)
    mt = name.split('+')[0]
    return (_model_order(mt), name != mt, name)


def _bool(x):
    return '-' if x is None else str(bool(x))


def _cell(run):
    return float(run['summary']['learning_rate']), _dropout(run)


def bakeoff_cells(runs):
    """Each model's chosen (lr, dropout) cell, from validation alone: (names in table order, {name: ((lr,
    dropout), that cell's runs by seed)}, {name: (tuning seed, its grid runs by cell)}). A model with tuning
    runs chooses the lowest best val loss of its grid at the tuning seed (the first of ties); one without
    (a control, or a sweep of the tuned configs) has the cell with the most seeds, then the lowest mean best
    val loss. Names are the sweep's (a variant's, e.g. vanilla+attn_dropout=0, is a model of its own)."""
    from runtime import mean_std
    by_model = {}
    for r in runs:
        by_model.setdefault(run_model_name(r), []).append(r)
    names = sorted(by_model, key=_name_order)
    cells, grids = {}, {}
    for name in names:
        rs, groups = by_model[name], {}
        for r in rs:
            groups.setdefault(_cell(r), []).append(r)
        tuned = [r for r in rs if str(r['config']['config'].get('sweep_stage', '')).startswith('tune')]
        if tuned:
            seed = min(int(r['summary']['seed']) for r in tuned)
            grid = sorted((r for r in rs if int(r['summary']['seed']) == seed), key=_cell)
            grids[name] = (seed, grid)
            c = _cell(min(grid, key=lambda r: float(r['summary']['best_val_loss'])))
        else:
            c = min(sorted(groups), key=lambda c: (-len(groups[c]),
                                                   mean_std([float(r['summary']['best_val_loss']) for r in groups[c]])[0]))
        cells[name] = (c, sorted(groups[c], key=lambda r: int(r['summary']['seed'])))
    return names, cells, grids


def bakeoff_contrasts(path=os.path.join(HERE, 'config', 'bakeoff.py')):
    """config/bakeoff.py's contrasts: [(model, against, what differs)], each control against what it isolates."""
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), {}, scope)
    return [tuple(c) for c in scope.get('contrasts', [])]


def bakeoff_tested(out, runs_dir, preset, runs, skipped):
    """The bake-off from records with a test split: tuning.csv (every run of a tuned model at its tuning seed),
    bakeoff.csv (one row per model and variant at its chosen (lr, dropout): test loss mean ± std over seeds,
    the difference from vanilla with Welch's 95% interval), the curves, and the plots. The chosen cell is the
    lowest best val loss of the tuning runs (validation alone; test is only reported); a model without tuning
    runs (a control, or a sweep of the tuned configs) has the (lr, dropout) with the most seeds."""
    from runtime import mean_std, welch
    old = [r['name'] for r in runs if not has_test_split(r)]
    skipped = skipped + [f"{n}: recorded before the test split (no test loss)" for n in old]
    runs = [r for r in runs if has_test_split(r)]
    for s in skipped:
        print(f"[bakeoff] skipped run {s}")
    print(f"[bakeoff] {len(runs)} finished runs with a test split from {runs_dir}")
    names, cells, grids = bakeoff_cells(runs)
    tuning_rows = []
    for name in names:
        seed, grid = grids.get(name, (None, []))
        for r in grid:
            s = r['summary']
            tuning_rows.append(dict(
                model=name, lr=f"{_cell(r)[0]:g}", dropout=f"{_cell(r)[1]:g}", seed=str(seed),
                best_val_loss=_f(float(s['best_val_loss']), '.4f'), best_iter=str(s['best_iter']),
                test_loss=_f(float(s['test_loss']), '.4f'), train_loss_at_best=_f(s.get('train_loss_at_best'), '.4f'),
                extended=str(r['config']['config'].get('sweep_stage') == 'tune-extended'),
                chosen=str(_cell(r) == cells[name][0])))

    van = cells.get('vanilla')
    van_test = [float(r['summary']['test_loss']) for r in van[1]] if van else []
    van_params = int(van[1][0]['summary']['n_params']) if van else None
    main_rows, curve_rows = [], []
    for name in names:
        (lr, d), rs = cells[name]
        test = [float(r['summary']['test_loss']) for r in rs]
        tm, ts = mean_std(test)
        n_params = sorted({int(r['summary']['n_params']) for r in rs})
        w = welch(test, van_test) if van and name != 'vanilla' else None
        tps = [float(r['summary']['tokens_per_s']) for r in rs if r['summary'].get('tokens_per_s') is not None]
        train_at = [float(r['summary']['train_loss_at_best']) for r in rs if r['summary'].get('train_loss_at_best')
                    is not None]
        held = [float(r['summary']['heldout_loss']) for r in rs if r['summary'].get('heldout_loss') is not None]
        extra = n_params[-1] - van_params if van_params else 0
        matched = '-' if van_params is None else (
            'yes' if abs(extra) <= model.MATCH_TOLERANCE * van_params else f"not matched ({extra / 1e6:+.2f}M)")
        main_rows.append(dict(
            model=name, params='/'.join(map(str, n_params)), matched=matched, lr=f'{lr:g}', dropout=f'{d:g}',
            n_seeds=str(len(rs)), seeds=' '.join(str(r['summary']['seed']) for r in rs),
            test_loss_mean=_f(tm, '.4f'), test_loss_std=_f(ts, '.4f'),
            test_ppl=_f(mean_std([math.exp(x) for x in test])[0], '.4f'),
            delta_vs_vanilla=_f(w['diff'], '+.4f') if w else '-', ci95_low=_f(w['low'], '+.4f') if w else '-',
            ci95_high=_f(w['high'], '+.4f') if w else '-',
            significant=(_bool(w['significant']) if w and math.isfinite(w['low']) else '-'),
            best_val_loss_mean=_f(mean_std([float(r['summary']['best_val_loss']) for r in rs])[0], '.4f'),
            best_iter=' '.join(str(r['summary']['best_iter']) for r in rs),
            train_loss_at_best=_f(mean_std(train_at)[0] if train_at else None, '.4f'),
            heldout_loss_mean=_f(mean_std(held)[0] if held else None, '.4f'),
            tokens_per_s=_f(mean_std(tps)[0] if tps else None, '.0f')))
        for r in rs:
            for e in r['evals']:
                curve_rows.append(dict(model=name, lr=f'{lr:g}', dropout=f'{d:g}', seed=str(r['summary']['seed']),
                                       iter=str(int(e['iter'])), flops=_f(float(e['flops']), '.6e'),
                                       val_loss=_f(float(e['val_loss']), '.4f'),
                                       val_ppl=_f(math.exp(float(e['val_loss'])), '.4f')))
    tests = {name: [float(r['summary']['test_loss']) for r in cells[name][1]] for name in names}
    contrast_rows = []
    for a, b, what in bakeoff_contrasts():
        if a in tests and b in tests:  # both trained: a's mean test loss minus b's
            w = welch(tests[a], tests[b])
            contrast_rows.append(dict(
                model=a, against=b, differs=what, n_seeds=f"{len(tests[a])}/{len(tests[b])}",
                diff=_f(w['diff'], '+.4f'), ci95_low=_f(w['low'], '+.4f'), ci95_high=_f(w['high'], '+.4f'),
                significant=_bool(w['significant']) if math.isfinite(w['low']) else '-'))
    write_csv(os.path.join(out, 'contrasts.csv'), contrast_rows,
              ['model', 'against', 'differs', 'n_seeds', 'diff', 'ci95_low', 'ci95_high', 'significant'])
    main_cols = ['model', 'params', 'matched', 'lr', 'dropout', 'n_seeds', 'seeds', 'test_loss_mean', 'test_loss_std',
                 'test_ppl', 'delta_vs_vanilla', 'ci95_low', 'ci95_high', 'significant', 'best_val_loss_mean',
                 'best_iter', 'train_loss_at_best', 'heldout_loss_mean', 'tokens_per_s']
    write_csv(os.path.join(out, 'bakeoff.csv'), main_rows, main_cols)
    write_csv(os.path.join(out, 'tuning.csv'), tuning_rows,
              ['model', 'lr', 'dropout', 'seed', 'best_val_loss', 'best_iter', 'test_loss', 'train_loss_at_best',
               'extended', 'chosen'])
    write_csv(os.path.join(out, 'bakeoff_curves.csv'), curve_rows,
              ['model', 'lr', 'dropout', 'seed', 'iter', 'flops', 'val_loss', 'val_ppl'])

    def distinct(key):
        return sorted({json.dumps(r['config'].get(key), sort_keys=True) for r in runs})
    write_json(os.path.join(out, 'bakeoff.meta.json'), {
        'name': 'bakeoff', 'preset': preset, 'runs_dir': os.path.relpath(runs_dir, out).replace(os.sep, '/'),
        'n_runs': len(runs), 'runs': [r['name'] for r in runs], 'skipped_runs': skipped,
        'git_commit': [json.loads(s) for s in distinct('git_commit')],
        'device': [json.loads(s) for s in distinct('device')],
        'versions': [json.loads(s) for s in distinct('versions')],
        'command': [json.loads(s) for s in distinct('command')],
        'method': "validation alone selects: each run's checkpoint is its lowest val loss (val.bin, the first half "
                  "of the last 10%), each tuned model's (lr, dropout) the lowest best val loss of its tuning grid "
                  "at one seed (tuning.csv; extended = a cell added because the choice was on an edge); test loss "
                  "(test.bin, the second half) is measured at that checkpoint and only reported: mean ± sample std "
                  "over the seeds at the chosen cell (test_ppl: mean of exp per seed); delta_vs_vanilla = mean test "
                  "loss minus vanilla's, with Welch's 95% interval (Welch-Satterthwaite df; '-' with fewer than 2 "
                  "seeds on a side); significant when the interval excludes 0; matched = total parameters within "
                  f"{model.MATCH_TOLERANCE:.0%} of vanilla's; heldout_loss = the whole last 10% (nanoGPT's val set, "
                  "for the comparison with nanoGPT only); tokens/s = mean of the runs' summaries",
    })
    plot_val_bands(curve_rows, os.path.join(out, 'bakeoff_val_loss.png'))
    plot_tuning_heatmaps(tuning_rows, os.path.join(out, 'bakeoff_tuning.png'))
    for r in main_rows:
        print(f"[bakeoff] {r['model']:>14}: lr {r['lr']}, dropout {r['dropout']}, test loss {r['test_loss_mean']} ± "
              f"{r['test_loss_std']} ({r['n_seeds']} seeds), vs vanilla {r['delta_vs_vanilla']} "
              f"[{r['ci95_low']}, {r['ci95_high']}]")
    return main_rows


def plot_val_bands(curve_rows, path):
    """Validation loss against iteration, one line per model at its chosen cell: the mean over seeds and a band
    of ± one sample std (no band for one seed)."""
    from runtime import mean_std
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(r['model'] for r in curve_rows))
    for i, name in enumerate(names):
        by_iter = {}
        for r in curve_rows:
            if r['model'] == name:
                by_iter.setdefault(int(r['iter']), []).append(float(r['val_loss']))
        its = sorted(by_iter)
        stats = [mean_std(by_iter[it]) for it in its]
        m = [s[0] for s in stats]
        col = plt.cm.tab10(i % 10)
        ax.plot(its, m, color=col, lw=1.5, label=f"{name} (n={max(len(v) for v in by_iter.values())})")
        if all(math.isfinite(s[1]) for s in stats):
            ax.fill_between(its, [a - s for a, (_, s) in zip(m, stats)], [a + s for a, (_, s) in zip(m, stats)],
                            color=col, alpha=0.2, lw=0)
    ax.set(xlabel='iteration', ylabel='validation loss', title='validation loss, mean ± std over seeds')
    lows = [float(r['val_loss']) for r in curve_rows]
    if lows:  # the models part by hundredths near their best: show that range, not the first evals' 4.2
        ax.set_ylim(min(lows) - 0.02, min(lows) + 0.3)
    if names:
        ax.legend(fontsize=6)
    fig.tight_layout()
    savefig(fig, path)


def plot_tuning_heatmaps(tuning_rows, path):
    """One heatmap per tuned model: best val loss over the (lr, dropout) grid, the choice boxed."""
    names = list(dict.fromkeys(r['model'] for r in tuning_rows))
    if not names:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in tuning_rows if r['model'] == name]
        lrs = sorted({float(r['lr']) for r in rows})
        ds = sorted({float(r['dropout']) for r in rows})
        grid = [[float('nan')] * len(lrs) for _ in ds]
        for r in rows:
            grid[ds.index(float(r['dropout']))][lrs.index(float(r['lr']))] = \
                float(r['best_val_loss']) if r['best_val_loss'] != '-' else float('nan')
        ax.imshow(grid, origin='lower', cmap='viridis_r', aspect='auto')
        for r in rows:
            x, y = lrs.index(float(r['lr'])), ds.index(float(r['dropout']))
            ax.text(x, y, r['best_val_loss'] + ('*' if r['extended'] == 'True' else ''), ha='center', va='center',
                    fontsize=7, color='w', fontweight='bold' if r['chosen'] == 'True' else 'normal')
            if r['chosen'] == 'True':
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec='r', lw=2))
        ax.set_xticks(range(len(lrs)), [f'{v:g}' for v in lrs], fontsize=7)
        ax.set_yticks(range(len(ds)), [f'{v:g}' for v in ds], fontsize=7)
        ax.set(title=name, xlabel='learning rate', ylabel='dropout')
    fig.suptitle('best val loss of the tuning grid (boxed: chosen; *: an edge extension)', fontsize=9)
    fig.tight_layout()
    savefig(fig, path)


def _reading(head, against, diff, low, high, significant, seeds):
    """One line of the reading: an order only where the interval excludes 0."""
    if significant == 'True':
        word = 'lower' if float(diff) < 0 else 'higher'
        return f"- {head}: test loss {word} than {against}'s by {diff} (95% CI [{low}, {high}], {seeds} seeds)."
    if significant == 'False':
        return f"- {head}: not distinguishable here from {against} (difference {diff}, 95% CI [{low}, {high}] includes 0)."
    return f"- {head}: not distinguishable here from {against} (fewer than 2 seeds on a side: no interval)."


def bakeoff_prose(rows):
    """The reading of bakeoff.csv: an order against vanilla only where the interval excludes 0."""
    lines = []
    for r in rows:
        if r['model'] == 'vanilla':
            continue
        note = f" ({r['matched']})" if r.get('matched', 'yes') not in ('yes', '-') else ''
        lines.append(_reading(r['model'] + note, 'vanilla', r['delta_vs_vanilla'], r['ci95_low'], r['ci95_high'],
                              r['significant'], r['n_seeds']))
    return lines


def contrasts_prose(rows):
    """The reading of contrasts.csv: each control against the model it isolates, read as bakeoff_prose reads."""
    return [_reading(f"{r['model']} ({r['differs']})", r['against'], r['diff'], r['ci95_low'], r['ci95_high'],
                     r['significant'], r['n_seeds']) for r in rows]


def bakeoff(out='results', preset=None, runs_dir=None):
    """Tables and plots from the sweep's run records (<out>/runs/<run>/, the sweep's results/<preset>/runs/).
    Deterministic: the files depend only on the records (and on <out>/memory.csv and latency.csv when present)."""
    runs_dir, preset = resolve_runs_dir(out, preset, runs_dir)
    runs, skipped = load_runs(runs_dir)
    if any(has_test_split(r) for r in runs):  # the records of the test split: the bake-off with seeds and CIs
        return bakeoff_tested(out, runs_dir, preset, runs, skipped)
    # records from before the test split (one seed, val loss only): the tables they always rendered to
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
            decode_mode=decode[mt][1] if mt in decode else '-',
            generate_ms_per_token_1024=_f(decode.get(mt, (None,) * 3)[2], '.3f'),
            generate_mode=decode[mt][3] if mt in decode else '-', train_tokens_per_s=_f(tps, '.0f'),
            train_mode=' / '.join(modes)))
        for r in rs:
            for e in r['evals']:
                curve_rows.append(dict(model=mt, learning_rate=f'{best_lr:g}', seed=str(r['summary']['seed']),
                                       iter=str(int(e['iter'])), flops=_f(float(e['flops']), '.6e'),
                                       val_loss=_f(float(e['val_loss']), '.4f'),
                                       val_ppl=_f(math.exp(float(e['val_loss'])), '.4f')))

    main_cols = ['model', 'n_params', 'lrs_finished', 'best_lr', 'n_seeds', 'seeds', 'best_val_loss_mean',
                 'best_val_loss_std', 'val_ppl_mean', 'val_ppl_std', 'oom_context_b1', 'oom_context_b4',
                 'decode_ms_per_token_1024', 'decode_mode', 'generate_ms_per_token_1024', 'generate_mode',
                 'train_tokens_per_s', 'train_mode']
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
                  "step replayed from a CUDA graph, eager = launched op by op); generate ms/token at 1024 = "
                  "latency.csv's generate_ms_per_token: generate() end to end with sample.py's sampling, prefill "
                  "excluded, in its fastest mode (generate_mode)",
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
    plt = pyplot()
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
    savefig(fig, path)


def plot_ppl_vs_flops(curve_rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mt in dict.fromkeys(r['model'] for r in curve_rows):
        by_iter = {}
        for r in curve_rows:
            if r['model'] == mt:
                by_iter.setdefault(int(r['iter']), []).append((float(r['flops']), float(r['val_ppl'])))
        pts = [(v[0][0], sum(p for _, p in v) / len(v)) for _, v in sorted(by_iter.items()) if v[0][0] > 0]
        if pts:
            ax.plot(*zip(*pts), marker='o', ms=3, color=color_of(mt), label=mt)
    ax.set(xscale='log', yscale='log', xlabel='cumulative training FLOPs', ylabel='validation perplexity',
           title='validation perplexity vs compute (best LR, mean over seeds)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


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


def _load_meta(out, name):
    p = os.path.join(out, f'{name}.meta.json')
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


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
                     + (f", {len(m['skipped_runs'])} runs skipped (unfinished, or recorded before the test split: "
                        f"bakeoff.meta.json's skipped_runs)" if m.get('skipped_runs') else ''))
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

    bakeoff_tables, bakeoff_sources = [], []

    def bakeoff_body(rows):
        if rows and 'test_loss_mean' in rows[0]:
            return bakeoff_tested_body(rows)
        # the headline's latency is generate() as users run it (sampling included); files from before it was
        # measured have the step alone
        timed = any(r.get('generate_ms_per_token_1024', '-') != '-' for r in rows)
        gen_cols = ['generate_ms_per_token_1024', 'generate_mode'] if timed else ['decode_ms_per_token_1024',
                                                                                   'decode_mode']
        gen_heads = ['generate() ms/token @1024', 'generate mode'] if timed else ['decode ms/token @1024',
                                                                                  'decode mode']
        for r in rows:
            r['loss'] = f"{r['best_val_loss_mean']} ± {r['best_val_loss_std']}"
            r['ppl'] = f"{r['val_ppl_mean']} ± {r['val_ppl_std']}"
        lines = [_md_table(rows, ['model', 'n_params', 'lrs_finished', 'best_lr', 'n_seeds', 'loss', 'ppl',
                                  'oom_context_b1', 'oom_context_b4', *gen_cols, 'train_tokens_per_s', 'train_mode'],
                           ['model', 'params', 'LRs finished', 'best LR', 'seeds', 'best val loss', 'val perplexity',
                            'OOM context (B=1)', 'OOM context (B=4)', *gen_heads, 'train tokens/s',
                            'runs executed with']), ""]
        bakeoff_tables.append(lines)  # the README quotes these (readme=True); the list grows below
        bakeoff_sources.append('bakeoff_lr.csv')
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

    def bakeoff_tested_body(rows):
        for r in rows:
            r['test'] = f"{r['test_loss_mean']} ± {r['test_loss_std']}"
            r['delta'] = '-' if r['delta_vs_vanilla'] == '-' else (
                f"{r['delta_vs_vanilla']} [{r['ci95_low']}, {r['ci95_high']}]")
        lines = [_md_table(rows, ['model', 'params', 'matched', 'lr', 'dropout', 'n_seeds', 'test', 'test_ppl', 'delta',
                                  'significant', 'best_iter', 'train_loss_at_best', 'tokens_per_s'],
                           ['model', 'params', 'param-matched', 'lr', 'dropout', 'seeds', 'test loss (mean ± std)',
                            'test perplexity', 'Δ test loss vs vanilla [95% CI]', 'significant', 'best iteration',
                            'train loss at best', 'train tokens/s']), "",
                 "Validation alone chose every checkpoint and every (lr, dropout); the test split is only "
                 "reported. Δ: Welch's 95% interval over seeds; an order is claimed only where it excludes 0:", "",
                 *bakeoff_prose(rows), ""]
        contrasts = read_csv(os.path.join(out, 'contrasts.csv')) if have('contrasts.csv') else []
        if contrasts:
            lines += ["The controls, each against the model it isolates, and the alternatives against each other "
                      "(contrasts.csv, config/bakeoff.py's contrasts; the same interval and reading):", "", *contrasts_prose(contrasts), ""]
        bakeoff_tables.append(lines)  # the README quotes these (readme=True)
        bakeoff_sources.append('tuning.csv')
        tune = read_csv(os.path.join(out, 'tuning.csv')) if have('tuning.csv') else []
        if tune:
            table, cols = _pivot(tune, lambda r: f"{r['model']} @ lr {r['lr']}", lambda r: f"dropout {r['dropout']}",
                                 lambda r: (f"**{r['best_val_loss']}**" if r['chosen'] == 'True' else r['best_val_loss'])
                                 + (' (ext.)' if r['extended'] == 'True' else ''))
            lines += ["Tuning grid: best val loss at one seed (tuning.csv; bold: chosen; ext.: added by an edge "
                      "extension):", "", _md_table(table, cols, ['model @ lr'] + cols[1:]), "",
                      img('bakeoff_tuning.png', 'tuning grid heatmaps'), ""]
        held = [r for r in rows if r.get('heldout_loss_mean') not in (None, '', '-')]
        if held:
            lines += ["For the comparison with nanoGPT only (its val set is the whole last 10%, where its "
                      "shakespeare_char run reaches 1.4697): " + ', '.join(f"{r['model']} {r['heldout_loss_mean']}"
                                                                           for r in held) + ".", ""]
        return lines + [img('bakeoff_val_loss.png', 'validation loss curves'), "", _meta_lines(out, 'bakeoff')]

    def memory_body(rows):
        err_cell, err_lines = errors_of(rows)

        def cell(r):
            if r['status'] == 'ok' and r['peak_gib']:
                return f"{float(r['peak_gib']):.3f}"
            return {'ok (peak not measured on cpu)': 'n/m'}.get(r['status'], err_cell(r['status']).split(' (')[0])
        table, cols = _pivot(rows, lambda r: r['context'], lambda r: f"{r['model']} B={r['batch']}", cell)
        lines = ["Peak training memory, fwd+bwd (GiB; OOM = out of memory; skipped = past the OOM; n/m = not "
                 "measured):", "", _md_table(table, cols, ['context'] + cols[1:]), "", *err_lines]
        if _peak_needs_cuda(rows):  # a table of "not measured" cells says less than one line
            lines = ["Peak training memory, fwd+bwd, and the OOM wall: needs CUDA (read from "
                     "torch.cuda.max_memory_allocated; on this device the fwd+bwd still ran at every context).", "",
                     *err_lines]
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
        lines = []
        gen = [r for r in rows if r['status'] == 'ok' and r.get('generate_ms_per_token')]
        if gen:  # (files written before generate() was timed have no such column: nothing rendered)
            sampling = _load_meta(out, 'latency').get('generate_sampling') or {}
            gmodes = ' / '.join(dict.fromkeys(r['generate_mode'] for r in gen))
            table, cols = _pivot(gen, lambda r: r['context'], lambda r: r['model'],
                                 lambda r: f"{float(r['generate_ms_per_token']):.3f} "
                                           f"({float(r['generate_vs_step']):.2f}x)")
            lines += [f"**Generation as users run it**: `generate()` ms per token after the prefill, sampling included "
                      f"(temperature {sampling.get('temperature', 0.8)}, top_k {sampling.get('top_k', 200)}: "
                      f"sample.py's "
                      f"defaults), in the fastest mode measured ({gmodes}); in parentheses: over the step alone "
                      f"(the next table's decode ms/token, same run):", "",
                      _md_table(table, cols, ['context'] + cols[1:]), ""]
            other = [md for md in GENERATE_COL if md not in {r['generate_mode'] for r in gen}
                     and any(r.get(GENERATE_COL[md]) for r in gen)]
            for md in other:
                table, cols = _pivot([r for r in gen if r.get(GENERATE_COL[md])], lambda r: r['context'],
                                     lambda r: r['model'], lambda r: f"{float(r[GENERATE_COL[md]]):.3f}")
                what = {'graph': "not compiled (what generate() and sample.py run below the break-even of "
                                 "compiling, model.compile_pays)", 'compiled graph': 'compiled',
                        'eager': 'eager steps'}[md]
                lines += [f"`generate()` ms per token, CUDA graph {what}, same run:" if md != 'eager' else
                          "`generate()` ms per token, eager steps, same run:", "",
                          _md_table(table, cols, ['context'] + cols[1:]), ""]
            built = [r for r in gen if r.get('compiled_build_s')]
            if built:
                first = {}
                for r in built:
                    first.setdefault(r['model'], r)
                lines += ["Building the compiled graphed step, first context of each model in the process "
                          "(compilation included): " + ', '.join(f"{mt} {float(r['compiled_build_s']):.1f} s"
                                                                   for mt, r in first.items()) + ".", ""]
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
            tables += [(f"Decode ms/token, {titles[md]}, same run", col) for md, col in DECODE_COL.items()
                       if any(r.get(col) for r in ok) and {_decode_mode(r) for r in ok} != {md}]
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

    def decode_throughput_body(rows):
        err_cell, err_lines = errors_of(rows)
        grid = sorted({int(r['batch']) for r in rows if r.get('source') == 'grid'})

        def cell(r):
            if r['status'] != 'ok':
                return err_cell(r['status']).split(' (')[0]
            return f"{float(r['tokens_per_s']):,.0f}" + (
                f" ({float(r['vs_vanilla']):.2f}x)" if r.get('vs_vanilla') else '')
        table, cols = _pivot([r for r in rows if r.get('source') == 'grid'],
                             lambda r: f"{r['model']} @ {int(r['context']):,}", lambda r: f"B={r['batch']}", cell)
        largest = {(r['model'], r['context']): r for r in rows if r.get('largest_fitting') in (True, 'True')}
        for t in table:
            mt, _, L = t['_'].partition(' @ ')
            r = largest.get((mt, L.replace(',', '')))
            t['largest'] = f"{int(r['batch']):,}: {float(r['tokens_per_s']):,.0f} ({r['limit']})" if r else '-'
        spreads = [float(r['spread_pct']) for r in rows if r.get('spread_pct')]
        meta = _load_meta(out, 'decode_throughput')
        s = meta.get('settings') or {}
        return ([f"Decoded tokens/s (all sequences together; in parentheses: over vanilla's at the same batch and "
                 f"context, same run), batch {', '.join(map(str, grid))}, and the largest batch that ran (found by "
                 f"doubling; what stopped it):", "",
                 _md_table(table, cols + ['largest'], ['model @ context'] + cols[1:] + ['largest batch: tokens/s']), "",
                 *err_lines, "Where the other models overtake vanilla (computed from decode_throughput.csv):", "",
                 *(overtakes(rows) or ['- no batch where two models both ran']), "",
                 f"Each figure: the median of {s.get('repeats', '?')} runs of {s.get('n_tokens', '?')} steps; the "
                 f"spread (slowest - fastest run) / median is at most {max(spreads, default=float('nan')):.1f}% over "
                 f"this file's shapes.", "",
                 img('decode_throughput.png', 'decode throughput vs batch'), "", _meta_lines(out, 'decode_throughput')])

    def vs_nanogpt_body(rows):
        return [_md_table(rows, ['impl', 'iters', 'median_ms', 'p10_ms', 'p90_ms', 'ratio_vs_nanogpt'],
                          ['implementation', 'timed iterations', 'median ms/iter', 'p10', 'p90', 'vs nanoGPT']), "",
                _meta_lines(out, 'vs_nanogpt')]

    def throughput_body(rows):
        err_cell, err_lines = errors_of(rows)
        add_vs_vanilla(rows, 'ms_per_iter', 'vs_vanilla')  # files written before the column existed
        for r in rows:
            ok = r['status'] == 'ok'
            r['ms'] = f"{float(r['ms_per_iter']):.2f}" if ok else err_cell(r['status'])
            if ok and r.get('min_ms'):  # the spread, in files since it is measured
                r['ms'] += f" ({float(r['min_ms']):.2f}-{float(r['max_ms']):.2f}, n={r['iters']})"
            r['x_van'] = f"{float(r['vs_vanilla']):.2f}x" if ok and r.get('vs_vanilla') else '-'
            r['tps'] = f"{float(r['tokens_per_s']):,.0f}" if ok else '-'
            # no MFU for an ok row: no peak FLOP/s, which is known (or measured) for CUDA devices only
            r['mfu_pct'] = (f"{100 * float(r['mfu']):.1f}" if r['mfu'] else 'needs CUDA') if ok else '-'
        spread = ["ms/iter: the median of n iterations, in parentheses min-max."] if any(
            r.get('min_ms') for r in rows) else []
        return [_md_table(rows, ['model', 'batch', 'context', 'ms', 'x_van', 'tps', 'mfu_pct', 'compile', 'cuda_graphs'],
                          ['model', 'B', 'T', 'ms/iter', 'x vanilla (same run)', 'tokens/s', 'MFU %', 'torch.compile',
                           'CUDA graph']), "",
                *err_lines, *spread, *([""] if spread else []),
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
            " (needs the sweep's run records in results/<preset>/runs/).")
    section('Memory', 'memory.csv', 'python bench.py memory', memory_body)
    section('Generation latency (batch 1)', 'latency.csv', 'python bench.py latency', latency_body)
    if have('decode_throughput.csv'):  # (a section of its own only where measured: older result folders lack it)
        section('Decode throughput at batch', 'decode_throughput.csv', 'python bench.py decode_throughput',
                decode_throughput_body)
    section('Training speed against nanoGPT (same shape, same run)', 'vs_nanogpt.csv',
            'python bench.py vs_nanogpt (karpathy/nanoGPT cloned into .nanogpt/)', vs_nanogpt_body)
    section('Training throughput', 'throughput.csv', 'python bench.py throughput', throughput_body)
    section('Data-parallel scaling (DDP)', 'scaling.csv', 'python bench.py scaling (2+ GPUs)', scaling_body)
    if have('length_generalization.csv'):  # (only where measured: it needs the runs' checkpoints)
        section('Length generalisation (loss against position)', 'length_generalization.csv',
                'python bench.py length_gen', lambda rows: length_gen_body(rows, out))

    path = os.path.join(out, 'REPORT.md')
    os.makedirs(out, exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(md))
    print(f"[bench] wrote {path}")
    if readme:
        if not bakeoff_tables:
            raise FileNotFoundError(f"no bakeoff.csv in {out}: run `python bench.py bakeoff --out={out}` first")
        _readme_block(BAKEOFF_MARK, f"Generated by `python bench.py report --out={out} --readme=True` from "
                                    f"{out}/bakeoff.csv and " + bakeoff_sources[0]
                      + ".\n\n" + _relink('\n'.join(bakeoff_tables[0]), out))
    return path


def _relink(md, out):
    """md written for <out>/REPORT.md with its plots linked by bare file name, relinked for the README at the
    repository root (![alt](plot.png) -> ![alt](<out>/plot.png))."""
    rel = os.path.relpath(out, HERE) if os.path.isabs(out) else out
    return re.sub(r'(!\[[^\]]*\]\()([^/)]+\))', lambda m: m.group(1) + rel.rstrip('/') + '/' + m.group(2), md)


def model_kw_from_runs(runs_dir):
    """{model_type: GPTConfig kwargs} of the models a sweep trained, read from its runs' config.json, so
    that the benchmarks measure the models the bake-off compares (the CPU preset's are smaller)."""
    runs, _ = load_runs(runs_dir)
    kw = {}
    for r in runs:
        mt = r['summary']['model_type']
        if mt in kw or r['config']['config'].get('variant'):  # a variant is not its model type's setting
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


README = os.path.join(HERE, 'README.md')


RUNS_MARK = ('<!-- runs-table:start -->', '<!-- runs-table:end -->')


BAKEOFF_MARK = ('<!-- bakeoff-table:start -->', '<!-- bakeoff-table:end -->')


def runs(runs_dir='results/full/runs', readme=False):
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


def plot_scaling(curves, gpus, path):
    """scaling_loss.png: the train-loss curves of one process and of DDP, a panel per (model, B, T)."""
    plt = pyplot()
    keys = list(dict.fromkeys(k[:3] for k in curves))
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
        for ax, (mt, B, T) in zip(axes[0], keys):
            for kind, style in (('single', '-'), ('ddp', '--')):
                if (mt, B, T, kind) in curves:
                    ax.plot(*zip(*curves[(mt, B, T, kind)]), style, color=color_of(mt),
                            label='1 process' if kind == 'single' else f'DDP, {gpus} processes')
            ax.set(title=f'{mt}, {gpus} x {B} x {T} tokens/step', xlabel='iteration', ylabel='train loss')
            ax.legend(fontsize=7)
        fig.tight_layout()
        savefig(fig, path)


# ----------------------------------------------------------------------------------------------
# the grid stages (train_runner.py --stages=mqar,state_tracking): CSVs, plots and REPORT.md from the run
# records under <out>/runs/ (config.json and summary.json of each run), deterministic given them

MQAR_COLS = ['model', 'd_model', 'seq_len', 'num_kv_pairs', 'lr', 'seed', 'accuracy', 'epochs', 'steps',
             'state_bytes', 'params']
STATE_TRACKING_COLS = ['model', 'variant', 'group', 'n_layer', 'train_len', 'test_len', 'accuracy', 'seed']
# each mixer's layout keys, stated in the grids' reports (those of its GPTConfig that exist)
LAYOUT_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'head_dim', 'pos_emb', 'conv_size', 'num_householder',
               'allow_neg_eigval', 'nsa_block_size', 'nsa_block_counts', 'nsa_window_size', 'mlp', 'd_ff')


def _grid_runs(out, runs_dir, what):
    runs_dir = runs_dir or os.path.join(out, 'runs')
    if not os.path.isdir(runs_dir):
        raise ValueError(f"{what}: no run records: {runs_dir} is not a folder (train them with "
                         f"`python train_runner.py --stages={what}`)")
    runs, skipped = load_runs(runs_dir)
    for s in skipped:
        print(f"[{what}] skipped run {s}")
    if not runs:
        raise ValueError(f"{what}: no finished runs (summary.json with status 'done') under {runs_dir}")
    return runs, skipped


def _state_bytes(model_config, context):
    """Decoding-state bytes at batch 1 and this context (model.decode_state_bytes, bf16), built on the meta
    device from a run's recorded architecture."""
    import torch
    mod = model.get_model_module(model_config['model_type'])
    names = {f.name for f in fields(mod.GPTConfig)}
    with torch.device('meta'):
        m = mod.GPT(mod.GPTConfig(**{k: v for k, v in model_config.items() if k in names}))
    return m.decode_state_bytes(1, context)


def _provenance(runs, skipped):
    """Where the runs ran: their commits and devices (from config.json), and the unfinished ones."""
    commits = sorted({r['config'].get('git_commit') or '?' for r in runs})
    devices = sorted({r['config'].get('device') or '?' for r in runs})
    return [f"- runs: {len(runs)} finished" + (f", {len(skipped)} not ({'; '.join(skipped[:8])}"
                                                + (' ...' if len(skipped) > 8 else '') + ")" if skipped else ''),
            f"- git commit(s) of the runs: {', '.join(f'`{c[:12]}`' for c in commits)}",
            f"- device(s): {', '.join(devices)}"]


def _layout_lines(runs, extra=()):
    """One line per distinct (model, layout) of the runs: what each mixer was, from its records."""
    seen = {}
    for r in runs:
        mc = r['config']['model_config']
        key = (mc['model_type'], tuple((k, mc[k]) for k in LAYOUT_KEYS + tuple(extra) if k in mc))
        seen.setdefault(key, None)
    return [f"- {mt}: " + ', '.join(f"{k}={v}" for k, v in kv) for mt, kv in
            sorted(seen, key=lambda k: (_model_order(k[0]), str(k[1])))]


def mqar(out='results/mqar', runs_dir=None):
    """results/mqar/ from the MQAR grid's run records: mqar.csv (a row per run: accuracy = the run's best test
    accuracy over its evaluations, which is its last when it stopped early; state_bytes = its decoding state at
    batch 1 and context seq_len), mqar_best.csv (the max over LRs, Zoology's figure, with the LR that gave it),
    mqar_vs_width.png, mqar_vs_state.png and REPORT.md. Deterministic: the files depend only on the records."""
    runs, skipped = _grid_runs(out, runs_dir, 'mqar')
    rows = []
    for r in runs:
        c, s = r['config']['config'], r['summary']
        rows.append(dict(model=c['model_type'], d_model=c['n_embd'], seq_len=c['seq_len'],
                         num_kv_pairs=c['num_kv_pairs'], lr=float(c['learning_rate']), seed=c['seed'],
                         accuracy=float(s['best_test_acc']), epochs=float(s['epochs']), steps=s['steps'],
                         state_bytes=_state_bytes(r['config']['model_config'], c['seq_len']),
                         params=r['config']['n_params']))
    order = lambda r: (r['seq_len'], r['num_kv_pairs'], _model_order(r['model']), r['d_model'], r['seed'], r['lr'])
    rows.sort(key=order)
    write_csv(os.path.join(out, 'mqar.csv'), rows, MQAR_COLS)
    best = {}
    for r in rows:  # rows are in lr order within a group: ties keep the smaller lr
        k = (r['model'], r['d_model'], r['seq_len'], r['num_kv_pairs'], r['seed'])
        if k not in best or r['accuracy'] > best[k]['accuracy']:
            best[k] = r
    best_rows = sorted(best.values(), key=order)
    write_csv(os.path.join(out, 'mqar_best.csv'), best_rows, MQAR_COLS)
    seed0 = min(r['seed'] for r in best_rows)  # the seed every grid point has
    plot_mqar(best_rows, seed0, os.path.join(out, 'mqar_vs_width.png'), os.path.join(out, 'mqar_vs_state.png'))
    _mqar_report(out, rows, best_rows, seed0, runs, skipped)
    return best_rows


def plot_mqar(best_rows, seed, path_width, path_state):
    plt = pyplot()
    rows = [r for r in best_rows if r['seed'] == seed]
    settings = list(dict.fromkeys((r['seq_len'], r['num_kv_pairs']) for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.4), squeeze=False, sharey=True)
    for ax, (L, kv) in zip(axes[0], settings):
        for mt in sorted({r['model'] for r in rows}, key=_model_order):
            pts = sorted((r['d_model'], r['accuracy']) for r in rows if r['model'] == mt and
                         (r['seq_len'], r['num_kv_pairs']) == (L, kv))
            ax.plot(*zip(*pts), 'o-', color=color_of(mt), label=mt)
        ax.set_xscale('log', base=2)
        ax.set_title(f"L={L}, kv={kv}")
        ax.set_xlabel('d_model')
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('accuracy (max over LRs)')
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path_width)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(settings, 'os^Dv<>p'))
    for mt in sorted({r['model'] for r in rows}, key=_model_order):
        for st in settings:
            pts = sorted((r['state_bytes'], r['accuracy']) for r in rows
                         if r['model'] == mt and (r['seq_len'], r['num_kv_pairs']) == st)
            ax.plot(*zip(*pts), markers[st] + '-', color=color_of(mt), alpha=0.8,
                    label=f"{mt}, L={st[0]} kv={st[1]}")
    ax.set_xscale('log')
    ax.set_xlabel('decoding-state bytes at context L (batch 1, bf16)')
    ax.set_ylabel('accuracy (max over LRs)')
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    savefig(fig, path_state)


def _mqar_report(out, rows, best_rows, seed0, runs, skipped):
    def acc(r):
        return f"{r['accuracy']:.3f}"
    main = [r for r in best_rows if r['seed'] == seed0]
    table, cols = _pivot(main, lambda r: f"{r['model']} d={r['d_model']}",
                         lambda r: f"L={r['seq_len']} kv={r['num_kv_pairs']}", acc)
    md = ["# MQAR (multi-query associative recall)", "",
          "Generated by `python bench.py mqar` from the run records in `runs/` (their config.json and summary.json); "
          "every number below is read from `mqar.csv` / `mqar_best.csv`, which the same command writes.", "",
          "Protocol: Zoology's (Arora et al. 2023, Figure 2): `config/mqar.py`, the grid `config/mqar_grid.py`. "
          f"Accuracy is over the query positions, averaged per example, on the "
          f"{'/'.join(sorted({str(r['config']['config']['n_test']) for r in runs}))} test examples; a run's figure "
          "is its best test accuracy over its evaluations (once per epoch; its last, where it stopped early above "
          "0.99), and the reported one the max over learning rates.", "",
          f"## Accuracy, max over learning rates (seed {seed0})", "",
          _md_table(table, cols, ['model'] + cols[1:]), "",
          "![accuracy against d_model](mqar_vs_width.png)", "",
          "![accuracy against decoding-state bytes](mqar_vs_state.png)", ""]
    # the bars of the published results, checked against the table
    checks = []
    att = [r for r in main if r['model'] == 'vanilla' and r['seq_len'] <= 256]
    if att:
        miss = [f"L={r['seq_len']} d={r['d_model']}: {r['accuracy']:.3f}" for r in att if r['accuracy'] < 0.99]
        checks.append("- attention >= 0.99 at every setting up to (256, 16): "
                      + ('met' if not miss else 'missed at ' + '; '.join(miss)))
    dn = [r for r in main if r['model'] == 'delta' and (r['seq_len'], r['num_kv_pairs']) == (512, 64)
          and r['d_model'] >= 128]
    if dn:
        miss = [f"d={r['d_model']}: {r['accuracy']:.3f}" for r in dn if r['accuracy'] < 0.99]
        checks.append("- DeltaNet >= 0.99 at (512, 64) for d_model >= 128: "
                      + ('met' if not miss else 'missed at ' + '; '.join(miss)))
    if checks:
        md += ["## The published bars", ""] + checks + [""]
    spread = {}
    for r in best_rows:
        spread.setdefault((r['model'], r['d_model'], r['seq_len'], r['num_kv_pairs']), []).append(r)
    multi = {k: v for k, v in spread.items() if len(v) > 1}
    if multi:
        srows = []
        for (mt, d, L, kv), rs in sorted(multi.items(), key=lambda it: (it[0][2], _model_order(it[0][0]), it[0][1])):
            mean, std = _mean_std([r['accuracy'] for r in rs])
            srows.append(dict(model=mt, setting=f"d={d} L={L} kv={kv}", n=len(rs),
                              acc=f"{mean:.3f} ± {_f(std, '.3f')}",
                              each=', '.join(f"{r['accuracy']:.3f} (lr {r['lr']:g})" for r in rs)))
        md += ["## Spread over seeds (max over LRs per seed)", "",
               _md_table(srows, ['model', 'setting', 'n', 'acc', 'each'],
                         ['model', 'setting', 'seeds', 'accuracy mean ± std', 'per seed (best lr)']), ""]
    lr_table, lr_cols = _pivot([r for r in rows if r['seed'] == seed0],
                               lambda r: f"{r['model']} d={r['d_model']} L={r['seq_len']}", lambda r: f"lr {r['lr']:g}",
                               lambda r: f"{r['accuracy']:.3f} ({r['epochs']:.1f} ep)")
    md += ["## Every learning rate (accuracy, epochs trained)", "", _md_table(lr_table, lr_cols, ['run'] + lr_cols[1:]),
           "", "## Layouts (from the run records)", ""] + _layout_lines(runs) + [
           "", "## Provenance", ""] + _provenance(runs, skipped) + [""]
    _write_md(os.path.join(out, 'REPORT.md'), md)


def _write_md(path, md):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(md))
    print(f"[bench] wrote {path}")


def variant_of(mc):
    """A state-tracking run's variant, from its recorded architecture: delta[0,1] / delta[-1,1] (beta in (0, 1) /
    (0, 2): the transitions' eigenvalue range), delta_product<n_h>[...], vanilla(<positions>), nsa."""
    mt = mc['model_type']
    rng = '[-1,1]' if mc.get('allow_neg_eigval') else '[0,1]'
    if mt == 'delta':
        return 'delta' + rng
    if mt == 'delta_product':
        return f"delta_product{mc['num_householder']}" + rng
    if mt == 'vanilla':
        return f"vanilla({mc['pos_emb']})"
    return mt


def state_tracking(out='results/state_tracking', runs_dir=None):
    """results/state_tracking/ from the word-problem grid's run records: state_tracking.csv (a row per run and
    test length: the accuracy over every position of fresh test sequences at the end of training),
    state_tracking.png (accuracy against test length, a panel per group, a line per variant: the mean over
    seeds, the band from the lowest to the highest seed) and REPORT.md. Deterministic given the records."""
    runs, skipped = _grid_runs(out, runs_dir, 'state_tracking')
    rows = []
    for r in runs:
        c, s, mc = r['config']['config'], r['summary'], r['config']['model_config']
        for n in c['test_lens']:
            acc = s.get(f'test_acc_{n}', s['test_acc'] if n == c['train_len'] else None)
            rows.append(dict(model=c['model_type'], variant=variant_of(mc), group=c['group'], n_layer=mc['n_layer'],
                             train_len=c['train_len'], test_len=n, accuracy=float(acc), seed=c['seed']))
    vorder = lambda v: (_model_order(v.split('[')[0].split('(')[0].rstrip('0123456789')), v)
    rows.sort(key=lambda r: (r['group'], vorder(r['variant']), r['seed'], r['test_len']))
    write_csv(os.path.join(out, 'state_tracking.csv'), rows, STATE_TRACKING_COLS)
    plot_state_tracking(rows, vorder, os.path.join(out, 'state_tracking.png'))
    stats = {}
    for r in rows:
        stats.setdefault((r['group'], r['variant'], r['test_len']), []).append(r['accuracy'])
    cell = lambda r: (lambda m_s: f"{m_s[0]:.3f} ± {_f(m_s[1], '.3f')}")(_mean_std(stats[(r['group'], r['variant'],
                                                                                        r['test_len'])]))
    md = ["# State tracking (group word problems)", "",
          "Generated by `python bench.py state_tracking` from the run records in `runs/`; every number below is "
          "read from `state_tracking.csv`, which the same command writes.", "",
          "Task: the running product of T group elements drawn uniformly (Z2: parity), the loss and accuracy over "
          "every position (`config/state_tracking.py`, grid `config/state_tracking_grid.py`). Trained at "
          "train_len, tested on fresh sequences at each test length; the accuracy is the run's last evaluation. "
          "Variants: delta[0,1] / delta[-1,1] = DeltaNet with beta in (0, 1) / (0, 2) (allow_neg_eigval); "
          "delta_product<n_h>[...] likewise with n_h Householder factors; vanilla(rope) = softmax attention with "
          "RoPE (learned positions can't reach past the training length); nsa with its own RoPE.", ""]
    for g in dict.fromkeys(r['group'] for r in rows):
        grows = [r for r in rows if r['group'] == g]
        table, cols = _pivot(grows, lambda r: r['variant'], lambda r: f"T={r['test_len']}", cell)
        n_seeds = len({r['seed'] for r in grows})
        md += [f"## {g}: accuracy, mean ± std over seeds ({n_seeds})", "",
               _md_table(table, cols, ['variant'] + cols[1:]), ""]
    md += ["![accuracy against test length](state_tracking.png)", "",
           "The published outcomes to compare with: DeltaProduct's README (S3, one layer): delta_product2[-1,1] "
           "trains, delta_product1[-1,1] does not converge, delta_product1[0,1] and delta_product2[0,1] do not "
           "converge; Grazzi et al. (ICLR 2025): DeltaNet[-1,1] solves parity and DeltaNet[0,1] does not; softmax "
           "attention does not length-generalise on parity (Deletang et al. 2023).", "",
           "## Layouts (from the run records)", ""] + _layout_lines(runs) + [
           "", "## Provenance", ""] + _provenance(runs, skipped) + [""]
    _write_md(os.path.join(out, 'REPORT.md'), md)
    return rows


def plot_state_tracking(rows, vorder, path):
    plt = pyplot()
    groups = list(dict.fromkeys(r['group'] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False, sharey=True)
    styles = ['-', '--', ':', '-.']
    for ax, g in zip(axes[0], groups):
        variants = sorted({r['variant'] for r in rows if r['group'] == g}, key=vorder)
        for k, v in enumerate(variants):
            lens = sorted({r['test_len'] for r in rows if r['group'] == g and r['variant'] == v})
            accs = [[r['accuracy'] for r in rows if (r['group'], r['variant'], r['test_len']) == (g, v, n)]
                    for n in lens]
            mean = [sum(a) / len(a) for a in accs]
            line, = ax.plot(lens, mean, 'o' + styles[k % len(styles)], label=v,
                            color=f'C{k % 10}')
            ax.fill_between(lens, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.15)
        ax.set_xscale('log', base=2)
        ax.set_title(f"{g} (train length {next(r['train_len'] for r in rows if r['group'] == g)})")
        ax.set_xlabel('test length')
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('accuracy (mean over seeds; band: min to max)')
    fig.tight_layout()
    savefig(fig, path)



# ----------------------------------------------------------------------------------------------
# length generalisation (bench.py length_gen)

def length_gen_body(rows, out):
    """REPORT.md's section: loss per position bucket at the longest context, a row per model, and the plot."""
    longest = max(int(r['context']) for r in rows)
    at = [r for r in rows if int(r['context']) == longest]
    def label(r):  # the seeds pooled: fewer than the bake-off's where a checkpoint was absent (the .meta.json)
        n = r.get('seeds')
        return f"{r['model']} ({r['mode']}" + (f", {n} seed{'' if str(n) == '1' else 's'})" if n else ')')
    table, cols = _pivot(at, label, lambda r: r['position_bucket'],
                         lambda r: f"{float(r['loss']):.3f}")
    trained = sorted({r['mode'] for r in rows})
    return [f"Next-token loss per position bucket at context {longest} (the test split's non-overlapping "
            f"windows; each model's and variant's checkpoints at its chosen (lr, dropout), pooled over the seeds "
            f"whose checkpoints were there: the .meta.json names them). Models without "
            f"learned positions run the whole context ('full'); vanilla with learned positions slides its "
            f"training window ('sliding N': each token predicted from the N before it), which makes it the "
            f"reference line: it never sees a position past N. Modes here: {', '.join(trained)}.", "",
            _md_table(table, cols, ['model'] + cols[1:]), "",
            "![loss against position](length_generalization.png)" if os.path.exists(
                os.path.join(out, 'length_generalization.png')) else "*Missing plot `length_generalization.png`.*",
            "", _meta_lines(out, 'length_generalization')]


def plot_length_gen(rows, path):
    """Loss against position (bucket midpoints), a panel per context, a line per model and variant (in the
    rows' order, one colour each across the panels)."""
    plt = pyplot()
    contexts = sorted({int(r['context']) for r in rows})
    names = list(dict.fromkeys(r['model'] for r in rows))
    fig, axes = plt.subplots(1, len(contexts), figsize=(3.6 * len(contexts), 3.6), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], contexts):
        at = [r for r in rows if int(r['context']) == c]
        for mt in [n for n in names if any(r['model'] == n for r in at)]:
            pts = [(sum(map(int, r['position_bucket'].split('-'))) / 2, float(r['loss']))  # bucket midpoints
                   for r in at if r['model'] == mt]
            mode = next(r['mode'] for r in at if r['model'] == mt)
            ax.plot(*zip(*sorted(pts)), 'o-', ms=3, color=plt.cm.tab10(names.index(mt) % 10),
                    label=mt + (f" ({mode})" if mode != 'full' else ''))
        ax.set_title(f"context {c}")
        ax.set_xlabel('position')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('next-token loss')
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)
