"""bench.py on CPU: every sub-command at tiny sizes writes its CSV, sidecar and plot; the report renders
from them; the bake-off is byte-for-byte reproducible from the run records."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import report  # noqa: E402
import model as model_lib  # noqa: E402
from model import CaptureError  # noqa: E402
from runtime import ConfigError  # noqa: E402

# tiny benchmark sizes: all four models where their modules import, a few seconds each on one thread
SIZES = dict(
    memory=dict(contexts=[16, 32], batches=[1, 4]),
    latency=dict(contexts=[8, 16], n_decode=2, trials=1),
    throughput=dict(shapes=[(2, 16)], iters=1, warmup=1),
    decode_throughput=dict(contexts=[16], batches=[1, 2], max_batch=4, n_tokens=2, repeats=2),
)
BAKEOFF_FILES = ['bakeoff.csv', 'bakeoff_lr.csv', 'bakeoff_ppl_vs_flops.csv', 'bakeoff.meta.json',
                 'bakeoff_val_loss.png', 'bakeoff_ppl_vs_flops.png']


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # tiny ops: a second intra-op thread only adds synchronisation stalls on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def write_fake_runs(runs_dir, models=('vanilla', 'delta'), lrs=(1e-3, 3e-3), seeds=(1337, 1338)):
    """Run records as train_runner writes them; vanilla's best LR is 1e-3, delta's 3e-3."""
    for mi, mt in enumerate(models):
        for lr in lrs:
            for seed in seeds:
                d = os.path.join(runs_dir, f'{mt}-lr{lr:g}-s{seed}')
                os.makedirs(d)
                good = (lr == 1e-3) == (mt == 'vanilla')
                final = 1.5 + 0.1 * mi - (0.2 if good else 0.0) + 0.01 * (seed - 1337)
                cfg = dict(model_type=mt, learning_rate=lr, seed=seed, max_iters=200, batch_size=4,
                           block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
                with open(os.path.join(d, 'config.json'), 'w') as f:
                    json.dump(dict(config=cfg, git_commit='abc123', device='cpu (test)', n_params=100000 + mi,
                                   versions=dict(torch='2.x'), preset='test', command='train_runner.py ...'), f)
                evals = []
                with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
                    for it in (0, 100, 200):
                        vl = 4.2 - (4.2 - final) * it / 200
                        evals.append(vl)
                        f.write(json.dumps(dict(kind='eval', iter=it, train_loss=vl - 0.05, val_loss=vl, lr=lr,
                                                tokens=it * 256, flops=it * 256 * 6e5, time_s=it * 0.1)) + '\n')
                        f.write(json.dumps(dict(kind='train', iter=it, loss=vl, lr=lr, ms_per_iter=10.0,
                                                mfu=0.1)) + '\n')
                with open(os.path.join(d, 'summary.json'), 'w') as f:
                    json.dump(dict(model_type=mt, learning_rate=lr, seed=seed, preset='test',
                                   best_val_loss=min(evals), best_iter=200, final_train_loss=final - 0.05,
                                   final_val_loss=final, iters=200, wall_s=20.0, tokens_per_s=25600.0 + mi,
                                   median_ms_per_iter=10.0, n_params=100000 + mi, out_dir=d, status='done'), f)
    os.makedirs(os.path.join(runs_dir, 'vanilla-lr0.01-s1337'))  # an unfinished run: no summary.json


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """Every sub-command once, tiny, into one folder (as `bench.py all --tiny=True` would)."""
    out = str(tmp_path_factory.mktemp('results'))
    write_fake_runs(os.path.join(out, 'runs', 'test'))
    rows = dict(params=bench.params(out, tiny=True),
                memory=bench.memory(out, tiny=True, **SIZES['memory']),
                latency=bench.latency(out, tiny=True, **SIZES['latency']),
                decode_throughput=bench.decode_throughput(out, tiny=True, **SIZES['decode_throughput']),
                throughput=bench.throughput(out, tiny=True, **SIZES['throughput']),
                bakeoff=bench.bakeoff(out))
    bench.report(out)
    return out, rows


def test_models_available():
    assert 'vanilla' in [mt for mt, _ in bench.available_models()]


@pytest.mark.parametrize('name', ['params', 'memory', 'latency', 'decode_throughput', 'throughput'])
def test_benchmark_files(results, name):
    out, rows = results
    for ext in ('.csv', '.meta.json', '.png'):
        if name == 'params' and ext == '.png':
            continue
        assert os.path.getsize(os.path.join(out, name + ext)) > 0, name + ext
    meta = json.load(open(os.path.join(out, name + '.meta.json')))
    for key in ('command', 'git_commit', 'device', 'versions', 'settings'):
        assert key in meta, key
    assert meta['settings']['tiny'] is True
    table = read(os.path.join(out, name + '.csv'))
    models = [mt for mt, _ in bench.available_models()]
    assert sorted({r['model'] for r in table}) == sorted(models)
    assert not [r for r in table if r.get('status', 'ok').startswith('error')], "a model failed its benchmark"


def test_params_matching(results):
    out, _ = results
    table = {r['model']: r for r in read(os.path.join(out, 'params.csv'))}
    assert float(table['vanilla']['diff_vs_vanilla_pct']) == 0
    for r in table.values():
        # tiny configs: each module's TINY may pick its own block_size (the vanilla it is matched to)
        assert abs(float(r['diff_vs_vanilla_pct'])) < 10, r
        assert int(r['non_embedding_params']) <= int(r['total_params'])
    notes = json.load(open(os.path.join(out, 'params.meta.json')))['d_ff_solve']
    assert len(notes) == len(table)


def test_params_full_size(tmp_path):
    """The real models (module defaults, ~10.7M): total params within 1% of vanilla's."""
    rows = bench.params(str(tmp_path))
    assert rows[0]['model'] == 'vanilla' and 10e6 < rows[0]['total_params'] < 11.5e6
    for r in rows:
        assert abs(r['diff_vs_vanilla_pct']) < 1, r


def test_memory_rows(results):
    out, _ = results
    table = read(os.path.join(out, 'memory.csv'))
    assert len(table) == len(set(r['model'] for r in table)) * 2 * 2  # every (model, batch, context)
    state = {(r['model'], int(r['context'])): int(r['state_bytes']) for r in table}
    # vanilla's KV cache grows linearly with the context
    assert state[('vanilla', 32)] == 2 * state[('vanilla', 16)] > 0
    # fwd+bwd is timed in the same run, and each model's ratio is against vanilla at the same (B, T)
    for r in table:
        assert float(r['fwdbwd_ms']) > 0
        if r['model'] == 'vanilla':
            assert float(r['fwdbwd_vs_vanilla']) == 1.0


def test_throughput_ratios_to_vanilla(results):
    """The speed targets are ratios to vanilla in one run: each row's vs_vanilla is its ms/iter over
    vanilla's at the same (B, T) of the same file, and the report shows them."""
    out, _ = results
    table = read(os.path.join(out, 'throughput.csv'))
    van = {(r['batch'], r['context']): float(r['ms_per_iter']) for r in table if r['model'] == 'vanilla'}
    assert van and all(r['vs_vanilla'] for r in table)
    for r in table:
        # (the file rounds to 6 significant digits)
        assert float(r['vs_vanilla']) == pytest.approx(float(r['ms_per_iter']) / van[(r['batch'], r['context'])], rel=1e-4)
    assert 'x vanilla (same run)' in open(os.path.join(out, 'REPORT.md')).read()


def test_memory_oom_stops_series(tmp_path, monkeypatch):
    """An OOM at context T records 'OOM', skips the longer contexts of that (model, batch) series, and
    the bake-off reads T as the OOM threshold."""
    def fake_peak(m, B, T, device):
        assert m.config.block_size == T  # every context really is that long
        if B * T >= 64:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        return 1000 * B * T
    monkeypatch.setattr(bench, 'measure_train_peak', fake_peak)
    out = str(tmp_path)
    rows = bench.memory(out, tiny=True, models='vanilla', contexts=[16, 32, 64, 128], batches=[1, 4])
    status = {(r['batch'], r['context']): r['status'] for r in rows}
    assert status[(1, 16)] == status[(1, 32)] == 'ok' and status[(1, 64)] == 'OOM'
    assert status[(1, 128)].startswith('skipped')
    assert status[(4, 16)] == 'OOM' and status[(4, 32)].startswith('skipped')
    assert rows[0]['peak_bytes'] == 16000
    assert report._oom_thresholds(out) == {'vanilla': {1: '64', 4: '16'}}


def test_latency_rows(results):
    out, _ = results
    table = read(os.path.join(out, 'latency.csv'))
    for r in table:
        assert float(r['prefill_ms']) > 0 and float(r['decode_ms_per_token']) > 0
        assert bool(r['nocache_ms_per_token']) == (r['model'] == 'vanilla')
        # no CUDA here: eager steps only, and they are the headline
        assert r['decode_mode'] == 'eager' and r['decode_eager_ms_per_token'] == r['decode_ms_per_token']
        assert not r['decode_graph_ms_per_token'] and not r['decode_compiled_ms_per_token']
        # generate() end to end beside the step: eager on CPU, its ratio to the step in the same row
        assert r['generate_mode'] == 'eager' and float(r['generate_ms_per_token']) > 0
        assert r['generate_eager_ms_per_token'] == r['generate_ms_per_token']
        assert float(r['generate_vs_step']) == pytest.approx(
            float(r['generate_ms_per_token']) / float(r['decode_ms_per_token']), rel=1e-4)
    md = open(os.path.join(out, 'REPORT.md')).read()
    assert '**Generation as users run it**' in md and "sample.py's defaults" in md
    with pytest.raises(ValueError, match="cuda_graph must be 'auto' or False"):
        bench.latency(out=out, tiny=True, device='cpu', cuda_graph=True)


def test_generate_sampling_is_sample_py_default():
    import sample
    assert bench.GENERATE_SAMPLING == {k: sample.DEFAULTS[k] for k in ('temperature', 'top_k')}


def test_decode_throughput_rows(results):
    """The tiny grid (contexts 16, batches 1 and 2) for every model, then doubling to max_batch 4: the
    largest batch marked, tokens/s = batch x steps / the median run, each against vanilla's; the report
    says where the others overtake vanilla."""
    out, _ = results
    table = read(os.path.join(out, 'decode_throughput.csv'))
    models = [mt for mt, _ in bench.available_models()]
    assert [(r['model'], r['batch'], r['source']) for r in table] == \
        [(mt, b, src) for mt in models for b, src in (('1', 'grid'), ('2', 'grid'), ('4', 'doubling'))]
    van = {r['batch']: float(r['tokens_per_s']) for r in table if r['model'] == 'vanilla'}
    for r in table:
        assert r['status'] == 'ok' and r['mode'] == 'eager'
        assert float(r['tokens_per_s_min']) <= float(r['tokens_per_s']) <= float(r['tokens_per_s_max'])
        assert float(r['tokens_per_s']) == pytest.approx(int(r['batch']) * 2 / float(r['ms_per_step']) * 1e3 / 2,
                                                         rel=1e-4)
        assert float(r['vs_vanilla']) == pytest.approx(float(r['tokens_per_s']) / van[r['batch']], rel=1e-4)
        assert (r['largest_fitting'] == 'True') == (r['batch'] == '4')
    assert {r['limit'] for r in table if r['largest_fitting']} == {'max_batch 4 reached'}
    md = open(os.path.join(out, 'REPORT.md')).read()
    assert '## Decode throughput at batch' in md and '](decode_throughput.png)' in md
    assert 'Where the other models overtake vanilla' in md and '- context 16: delta ' in md


def test_decode_throughput_doubles_to_the_memory_wall(tmp_path, monkeypatch):
    """Out of memory ends a (model, context) series: the grid batches past it are skipped, doubling then
    searches between the largest batch that ran and the first that did not, and the largest is marked with
    what stopped it. With times where DeltaNet's step costs little more at a larger batch and vanilla's grows
    with batch x context, the report finds the batch where DeltaNet overtakes vanilla."""
    def fake(m, B, L, n, repeats, device, mode):
        mt = m.config.model_type
        if B * L > {'vanilla': 24 * 16, 'delta': 10 ** 9}[mt]:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        ms = (1 + 0.03 * B * L) if mt == 'vanilla' else (2 + 0.05 * B)
        return [ms * n, ms * n * 1.1][:repeats]
    monkeypatch.setattr(bench, 'time_batched_decode', fake)
    rows = bench.decode_throughput(str(tmp_path), tiny=True, device='cpu', models='vanilla,delta', contexts=[16],
                                   batches=[1, 8, 64], max_batch=256, n_tokens=2, repeats=2)
    st = {(r['model'], r['batch']): (r['status'], r['source']) for r in rows}
    assert st[('vanilla', 64)] == ('OOM', 'grid') and st[('vanilla', 16)] == ('ok', 'doubling')
    assert st[('vanilla', 32)] == ('OOM', 'doubling') and ('vanilla', 128) not in st
    assert [r['batch'] for r in rows if r.get('largest_fitting')] == [16, 256]
    assert [r['limit'] for r in rows if r.get('largest_fitting')] == ['OOM at batch 32', 'max_batch 256 reached']
    lines = report.overtakes(read(os.path.join(tmp_path, 'decode_throughput.csv')))
    assert len(lines) == 1 and lines[0].startswith('- context 16: delta overtakes vanilla from batch 8 on'), lines
    assert 'at the largest batch each ran (delta 256, vanilla 16)' in lines[0]
    # a grid batch out of memory skips the larger grid batches
    monkeypatch.setattr(bench, 'time_batched_decode', lambda m, B, *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError('CUDA out of memory')) if B >= 8 else [1.0, 1.0])
    rows = bench.decode_throughput(str(tmp_path), tiny=True, device='cpu', models='vanilla', contexts=[16],
                                   batches=[1, 8, 64], max_batch=256, n_tokens=2, repeats=2)
    assert [(r['batch'], r['status']) for r in rows] == [(1, 'ok'), (8, 'OOM'), (64, 'skipped (OOM at 8)'),
                                                       (2, 'ok'), (4, 'ok')]
    assert rows[-1]['largest_fitting'] and rows[-1]['limit'] == 'OOM at batch 8'
    with pytest.raises(ValueError, match='needs CUDA'):
        bench.decode_throughput(str(tmp_path), tiny=True, device='cpu', compile=True)


def test_latency_keeps_the_fastest_decode_mode_and_notes_a_failed_graph():
    modes = ['compiled graph', 'graph', 'eager']
    fine = {'compiled graph': 0.3, 'graph': 0.2, 'eager': 2.0}

    def timer(times):
        def t(mode):
            if isinstance(times[mode], Exception):
                raise times[mode]
            return 1.0, times[mode]
        return t
    row, notes = {}, []
    bench._time_decode_modes(row, modes, timer(fine), notes)
    assert notes == [] and (row['decode_mode'], row['decode_ms_per_token']) == ('graph', 0.2)  # the fastest
    assert row['decode_compiled_ms_per_token'] == 0.3 and row['decode_eager_ms_per_token'] == 2.0
    row, notes = {}, []
    # a failed compilation, and out of memory while capturing (eager steps may still fit): skipped, noted
    bench._time_decode_modes(row, modes, timer({'compiled graph': CaptureError('torch.compile failed\nmore'),
                                                'graph': CaptureError('out of memory while capturing'),
                                                'eager': 2.0}), notes)
    assert notes == ['compiled graph failed: torch.compile failed', 'graph failed: out of memory while capturing']
    assert row['decode_mode'] == 'eager' and 'decode_graph_ms_per_token' not in row
    for mode in modes:  # any other error propagates (out of memory then becomes the row's status)
        with pytest.raises(RuntimeError, match='a bug'):
            bench._time_decode_modes({}, modes, timer({**fine, mode: RuntimeError('a bug')}), [])
    notes = []  # the notes of the modes before a failing one are kept
    with pytest.raises(torch.OutOfMemoryError):
        bench._time_decode_modes({}, modes, timer({**fine, 'graph': CaptureError('no capture'),
                                                   'eager': torch.OutOfMemoryError('CUDA out of memory')}), notes)
    assert notes == ['graph failed: no capture']


def test_profile_training_and_decoding_modes(tmp_path):
    out = str(tmp_path)
    rows = bench.profile(out=out, tiny=True, device='cpu', modes='eager,decode,decode_compiled', steps=2)
    by = {(r['model'], r['mode']): r for r in rows}
    models = list(dict.fromkeys(r['model'] for r in rows))
    assert models == list(model_lib.MODEL_TYPES) and len(rows) == 3 * len(models)
    for mt in models:
        assert by[mt, 'eager']['status'] == 'ok' and (by[mt, 'eager']['batch'], by[mt, 'eager']['context']) == (4, 32)
        dec = by[mt, 'decode']
        assert dec['status'] == 'ok' and (dec['batch'], dec['context']) == (1, 32) and dec['ms_per_iter'] > 0
        text = open(os.path.join(out, f'profile_{mt}_decode.txt')).read()
        assert text.startswith(f'{mt} (decode), B=1 T=32: wall') and 'ms/token' in text
        # the compiled step is captured in a CUDA graph: on CPU a clear error, not a silent eager run
        assert "'decode_compiled' needs CUDA" in by[mt, 'decode_compiled']['status']
    assert len(read(os.path.join(out, 'profile.csv'))) == len(rows)
    with pytest.raises(ValueError, match="unknown profile mode.*valid: eager, compiled, train, decode"):
        bench.profile(out=out, tiny=True, device='cpu', modes='decoding')


def test_bakeoff_values(results):
    out, rows = results
    table = {r['model']: r for r in read(os.path.join(out, 'bakeoff.csv'))}
    assert sorted(table) == ['delta', 'vanilla']
    assert table['vanilla']['best_lr'] == '0.001' and table['delta']['best_lr'] == '0.003'
    # vanilla @1e-3: seeds reach 1.3 and 1.31
    assert table['vanilla']['best_val_loss_mean'] == '1.3050'
    assert table['vanilla']['best_val_loss_std'] == f'{math.sqrt(0.005 ** 2 * 2):.4f}'
    assert table['vanilla']['val_ppl_mean'] == f'{(math.exp(1.3) + math.exp(1.31)) / 2:.4f}'
    assert table['vanilla']['n_seeds'] == '2'
    # the tiny memory run: no OOM up to 32 on CUDA; on CPU (no peak-memory counter) the column says so
    assert table['vanilla']['oom_context_b1'] == ('>32' if torch.cuda.is_available() else 'needs CUDA')
    lr = read(os.path.join(out, 'bakeoff_lr.csv'))
    assert len(lr) == 4 and sum(r['best'] == 'True' for r in lr) == 2
    curve = read(os.path.join(out, 'bakeoff_ppl_vs_flops.csv'))
    assert len(curve) == 2 * 2 * 3  # 2 models x 2 seeds (best LR) x 3 evals
    meta = json.load(open(os.path.join(out, 'bakeoff.meta.json')))
    assert meta['git_commit'] == ['abc123'] and meta['n_runs'] == 8 and len(meta['skipped_runs']) == 1


def test_bakeoff_is_reproducible(results, tmp_path):
    """Twice over the same records (a copy in another folder, another time): byte-identical files."""
    import shutil
    out, _ = results
    first = {f: open(os.path.join(out, f), 'rb').read() for f in BAKEOFF_FILES}
    copy = str(tmp_path / 'again')
    shutil.copytree(os.path.join(out, 'runs'), os.path.join(copy, 'runs'))
    for f in ('memory.csv', 'memory.meta.json', 'latency.csv', 'latency.meta.json'):
        shutil.copy(os.path.join(out, f), copy)
    bench.bakeoff(copy, preset='test')
    bench.bakeoff(out)
    for f in BAKEOFF_FILES:
        assert open(os.path.join(copy, f), 'rb').read() == first[f], f
        assert open(os.path.join(out, f), 'rb').read() == first[f], f


def test_report(results):
    out, _ = results
    md = open(os.path.join(out, 'REPORT.md')).read()
    for section in ('## Parameters', '## Bake-off', '## Memory', '## Generation latency', '## Training throughput'):
        assert section in md
    for png in ('memory.png', 'latency.png', 'throughput.png', 'bakeoff_val_loss.png', 'bakeoff_ppl_vs_flops.png'):
        assert f']({png})' in md and os.path.exists(os.path.join(out, png))
    assert 'Missing: `selfcheck.csv`' in md  # CPU: no self-check results, and the report says so
    assert '| vanilla |' in md and 'git commit' in md


def test_readme_blocks_are_generated(results, tmp_path, monkeypatch):
    """report(readme=True) and runs(readme=True) rewrite only their README blocks, from the files."""
    out, _ = results
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n' + '\n'.join(report.BAKEOFF_MARK) + '\nmiddle\n' + '\n'.join(report.RUNS_MARK) + '\nend\n')
    monkeypatch.setattr(report, 'README', str(readme))
    bench.report(out, readme=True)
    bench.runs(runs_dir=out, readme=True)
    text = readme.read_text()
    assert text.startswith('intro\n') and '\nmiddle\n' in text and text.endswith('\nend\n')
    block = text[text.index(report.BAKEOFF_MARK[0]):text.index(report.BAKEOFF_MARK[1])]
    assert 'bakeoff.csv' in block and '| vanilla |' in block and 'Mean best validation loss per learning rate' in block
    assert '![' not in block  # tables only: the README places its own plots
    with pytest.raises(FileNotFoundError, match='bench.py bakeoff'):
        bench.report(str(tmp_path / 'empty'), readme=True)


def test_report_states_missing(tmp_path):
    md = open(bench.report(str(tmp_path))).read()
    assert md.count('*Missing:') == 8 and '![' not in md


def test_cli(results, tmp_path):
    out, _ = results
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), *a], capture_output=True,
                                    text=True, cwd=str(tmp_path), timeout=120)
    r = run('selfcheck', '--device=cpu', f'--out={tmp_path}')
    assert r.returncode == 0 and 'need' in r.stdout.lower()
    r = run('bakeoff', f'--out={out}', '--preset=test')
    assert r.returncode == 0, r.stderr
    r = run('bakeoff', f'--out={out}', '--nope=1')
    assert r.returncode != 0 and 'valid keys' in r.stderr
    r = run('bakeoff', f'--out={out}', '--preset=missing')
    assert r.returncode != 0 and 'valid choices' in r.stderr


def test_vs_nanogpt_side_by_side(prepared, tmp_path):
    """The nanoGPT comparison runs nanoGPT's train.py (here a stand-in that prints nanoGPT's log format at
    a fixed 50 ms/iter; the real one is git-ignored) and our vanilla in one call, and reports the ratio."""
    fake = tmp_path / 'nanogpt'
    (fake / 'config').mkdir(parents=True)
    (fake / 'config' / 'train_shakespeare_char.py').write_text('')
    (fake / 'train.py').write_text(
        "import sys, os\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[2:])\n"
        "assert os.path.exists('data/shakespeare_char/train.bin')\n"
        "for i in range(int(args['max_iters']) + 1):\n"
        "    print(f'iter {i}: loss 2.5000, time 50.00ms, mfu -100.00%')\n")
    rows = bench.vs_nanogpt(out=str(tmp_path / 'out'), nanogpt_dir=str(fake), iters=30, skip=5, tiny=True,
                            device='cpu')
    assert rows[0]['impl'] == 'nanoGPT' and rows[0]['median_ms'] == 50.0 and rows[0]['iters'] == 26
    assert rows[1]['median_ms'] > 0 and rows[1]['ratio_vs_nanogpt'] == rows[1]['median_ms'] / 50.0
    table = read(os.path.join(tmp_path / 'out', 'vs_nanogpt.csv'))
    assert [r['impl'] for r in table] == ['nanoGPT', 'this repo (vanilla)']
    with pytest.raises(FileNotFoundError, match='clone karpathy/nanoGPT'):
        bench.vs_nanogpt(out=str(tmp_path), nanogpt_dir=str(tmp_path / 'nope'))


def test_scaling_ddp_against_one_process(prepared, tmp_path):
    """bench.scaling on CPU (gloo): one process with 2 micro-steps against torchrun with 2 processes, same
    global batch: both train, tokens/s of each and their ratio, the two curves plotted, records kept."""
    rows = bench.scaling(out=str(tmp_path), tiny=True, device='cpu', models='vanilla', iters=20)
    (r,) = rows
    assert r['status'] == 'ok' and r['tokens_per_step'] == 2 * 8 * 32
    assert r['scaling'] == r['ddp_tokens_per_s'] / r['single_tokens_per_s'] > 0
    assert abs(r['val_diff']) < 0.1  # 20 steps from the same init on the same global batch size
    assert os.path.exists(tmp_path / 'scaling_loss.png') and os.path.exists(tmp_path / 'scaling.meta.json')
    rec = json.load(open(tmp_path / 'scaling_runs' / 'vanilla-B8-T32-ddp' / 'config.json'))
    assert rec['world_size'] == 2 and rec['cuda_graphs'] is False
    md = open(bench.report(out=str(tmp_path))).read()  # the report renders the scaling table and its plot
    assert '## Data-parallel scaling (DDP)' in md and '| vanilla | 2 x 8 x 32 | 20 |' in md
    assert '![loss curves, DDP vs one GPU](scaling_loss.png)' in md
    with pytest.raises(ValueError, match='gpus must be >= 2'):
        bench.scaling(out=str(tmp_path), tiny=True, device='cpu', gpus=1)


def test_the_default_benchmark_grid_is_the_exhaustive_ones_curves_with_fewer_points():
    """--grid=default (the reproduction's) keeps a subset of the exhaustive grid's points, and every point the
    results quote: latency at 128 (flat in context), 1024 (the bake-off's column), 8192 and 32768; memory's
    wall up to 131072 and the 65536 comparison; decode throughput at 1024 and 32768; training at the
    training shape and at 16384 tokens in one sequence."""
    d, e = bench.BENCH_GRIDS['default'], bench.BENCH_GRIDS['exhaustive']
    for k in ('memory_contexts', 'latency_contexts', 'decode_contexts', 'decode_batches', 'throughput_shapes'):
        assert set(map(tuple, d[k]) if k == 'throughput_shapes' else d[k]) <= \
            set(map(tuple, e[k]) if k == 'throughput_shapes' else e[k]), k
        assert len(d[k]) <= len(e[k]), k
    assert {128, 1024, 8192, 32768} <= set(d['latency_contexts'])
    assert {65536, 131072} <= set(d['memory_contexts']) and tuple(d['memory_batches']) == (1, 4)
    assert {1024, 32768} <= set(d['decode_contexts']) and d['decode_max_batch'] >= 16384
    assert {(64, 256), (1, 16384)} <= set(d['throughput_shapes'])
    with pytest.raises(ConfigError, match='default, exhaustive'):
        bench.grid_sizes(False, 'huge')
