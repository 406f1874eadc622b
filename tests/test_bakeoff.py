"""The bake-off's machinery: validation alone selects (checkpoints and the tuning's choice; the test split is
only reported), the tuning grid's edge extension, model variants and their names, the statistics (Welch's
interval on worked examples), --shard's partition, and a tiny end-to-end --tune sweep whose tables regenerate
byte for byte."""
import json
import math
import os
import shutil

import pytest
import torch

import report
import runtime
import tasks
import train_runner
from train_runner import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, device='cpu', compile=False,
            max_iters=6, eval_interval=2, eval_iters=1, log_interval=2, warmup_iters=0, eval_batch_size=4)


# ----------------------------------------------------------------------------- statistics

def test_t_quantiles_match_the_tables():
    for df, t in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272), (1e7, 1.959964)):
        assert runtime.t_quantile(0.975, df) == pytest.approx(t, abs=2e-6)
    assert runtime.t_quantile(0.95, 10) == pytest.approx(1.812461, abs=2e-6)
    assert runtime.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)
    assert runtime.t_cdf(0.0, 3) == 0.5 and runtime.t_cdf(2.776445, 4) == pytest.approx(0.975, abs=1e-7)
    with pytest.raises(ValueError):
        runtime.t_quantile(1.0, 4)


def test_welch_interval_on_worked_examples():
    # means 2 and 5, variances 1 and 1, n 3 and 3: se = sqrt(2/3) = 0.816497, df = 4 (by hand),
    # half-width 2.776445 * 0.816497 = 2.266958: [-5.266958, -0.733042], excludes 0
    w = runtime.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w['diff'] == -3.0 and w['se'] == pytest.approx(0.816497, abs=1e-6) and w['df'] == pytest.approx(4.0)
    assert (w['low'], w['high']) == (pytest.approx(-5.266958, abs=1e-5), pytest.approx(-0.733042, abs=1e-5))
    assert w['significant'] is True
    # n 6 and 6, variances 3.5 and 3.5: se = sqrt(7/6) = 1.080123, df = 10, half-width 2.228139 * se = 2.406665
    w = runtime.welch([1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7])
    assert w['df'] == pytest.approx(10.0) and w['low'] == pytest.approx(-1 - 2.406665, abs=1e-5)
    assert w['high'] == pytest.approx(-1 + 2.406665, abs=1e-5) and w['significant'] is False
    # unequal variances (1 and 20/3; n 3 and 4): se^2 = 1/3 + 5/3 = 2, df = 4 / (1/18 + 25/27) = 4.075472
    w = runtime.welch([1, 2, 3], [2, 4, 6, 8])
    assert w['se'] == pytest.approx(math.sqrt(2)) and w['df'] == pytest.approx(4.075472, abs=1e-6)
    # one seed on a side: no interval, never "significant"
    w = runtime.welch([1.0], [2.0, 3.0])
    assert math.isnan(w['low']) and w['significant'] is False
    assert runtime.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


# ----------------------------------------------------------------------------- variants

def test_variants_parse_against_their_models_config():
    assert train_runner.parse_model('vanilla') == ('vanilla', {})
    assert train_runner.parse_model('vanilla+attn_dropout=0') == ('vanilla', {'attn_dropout': 0.0})
    assert train_runner.parse_model('delta_product+allow_neg_eigval=True+d_ff=1536') == \
        ('delta_product', {'allow_neg_eigval': True, 'd_ff': 1536})
    assert train_runner.parse_model('vanilla+n_head=16+n_kv_head=1+head_dim=32+pos_emb=rope+d_ff=-1') == \
        ('vanilla', {'n_head': 16, 'n_kv_head': 1, 'head_dim': 32, 'pos_emb': 'rope', 'd_ff': -1})
    for bad, msg in (('vanila', r"unknown model 'vanila'.*valid models: vanilla, delta, delta_product, nsa"),
                     ('delta+attn_dropout=0', r"'attn_dropout' is not a variant key of delta's config; valid keys:"
                                              r".*allow_neg_eigval"),
                     ('vanilla+dropout=0.1', r'the sweep chooses dropout'),
                     ('vanilla+attn_dropout', r'expected \+key=value'),
                     ('vanilla+pos_emb=alibi', r"model 'vanilla\+pos_emb=alibi': pos_emb must be one of"),
                     ('delta+allow_neg_eigval=yes', r'allow_neg_eigval must be a bool'),
                     ('vanilla+n_head=2+n_head=4', 'twice')):
        with pytest.raises(ConfigError, match=msg):
            train_runner.parse_model(bad)


def test_the_controls_of_the_config_are_valid_models():
    tuned, controls = train_runner.bakeoff_config('full')
    assert set(tuned) == {'vanilla', 'delta', 'delta_product', 'nsa'}
    assert len(controls) == 5
    for name in controls:
        mt, keys = train_runner.parse_model(name)
        cfg = train_runner.resolve_config(None, {'model_type': mt, **keys})  # builds it: matched, or d_ff given
        assert cfg['model_type'] == mt


# ----------------------------------------------------------------------------- planning: grid, shards

def planner(tmp_path, **opts):
    o = {**train_runner.SWEEP_KEYS, 'models': 'vanilla', 'tune': True, **opts}
    p = train_runner._Planner(o, dict(TINY), train_runner.PRESETS['cpu'], 'cpu', str(tmp_path),
                              *train_runner.bakeoff_config('cpu'))
    return p


def fake_record(run, best_val, test=9.0, status='done'):
    """A finished run's records as train() writes them (the parts the sweep and the bake-off read)."""
    os.makedirs(run['out_dir'], exist_ok=True)
    cfg = train_runner.resolve_config(None, run['cfg'])
    runtime.atomic_write_json({'config': cfg, 'splits': {'train': 1, 'val': 1, 'test': 1}, 'n_params': 1000},
                              os.path.join(run['out_dir'], 'config.json'))
    runtime.atomic_write_json({'model_type': cfg['model_type'], 'model': cfg['variant'] or cfg['model_type'],
                               'learning_rate': run['lr'], 'dropout': run['dropout'], 'seed': run['seed'],
                               'best_val_loss': best_val, 'best_iter': 4, 'test_loss': test,
                               'train_loss_at_best': best_val - 0.5, 'heldout_loss': (best_val + test) / 2,
                               'n_params': 1000, 'tokens_per_s': 100.0, 'status': status},
                              os.path.join(run['out_dir'], 'summary.json'))


def test_grid_extension_rule():
    grid = [(lr, d) for lr in (5e-4, 1e-3, 3e-3) for d in (0.1, 0.2, 0.3)]
    assert train_runner.grid_extension(grid, (1e-3, 0.2)) == ([], [], [])  # interior: done
    assert train_runner.grid_extension(grid, (5e-4, 0.2))[:2] == ([2.5e-4], [])  # the ratio on that side: 2
    assert train_runner.grid_extension(grid, (3e-3, 0.3))[:2] == ([9e-3], [0.4])  # 3; dropout + 0.1
    assert train_runner.grid_extension(grid, (1e-3, 0.1))[:2] == ([], [0.0])
    at0 = [(lr, d) for lr in (5e-4, 1e-3, 3e-3) for d in (0.0, 0.1)]
    new_lrs, new_d, notes = train_runner.grid_extension(at0, (1e-3, 0.0))
    assert (new_lrs, new_d) == ([], []) and notes == ['dropout 0 is at the bound 0']
    assert train_runner.grid_extension([(1e-3, 0.4), (1e-3, 0.5)], (1e-3, 0.5))[2] == ['dropout 0.5 is at the bound 0.5']
    assert train_runner.grid_extension([(1e-2, 0.1), (3e-2, 0.1)], (3e-2, 0.1))[0] == []  # 9e-2: past LR_BOUNDS
    assert train_runner.grid_extension([(1e-3, 0.1)], (1e-3, 0.1)) == ([], [], [])  # one value: no edge


def test_tuning_extends_an_edge_choice_until_interior_and_ignores_test(tmp_path):
    p = planner(tmp_path, lrs='1e-3,3e-3,9e-3', dropouts='0.1,0.2')
    plan, waiting = p.plan()
    assert len(plan) == 6 and waiting and 'vanilla' not in p.choices
    # val prefers high lr and high dropout (a corner); test prefers the opposite corner, and must not count
    for r in plan:
        fake_record(r, best_val=2.0 - r['lr'] * 10 - r['dropout'], test=1.0 + r['lr'] * 10 + r['dropout'])
    plan, _ = p.plan()
    new = [r for r in plan if r['stage'] == 'tune-extended']
    assert sorted({(r['lr'], r['dropout']) for r in new}) == sorted(
        [(2.7e-2, d) for d in (0.1, 0.2, 0.3)] + [(lr, 0.3) for lr in (1e-3, 3e-3, 9e-3)])
    for r in new:
        fake_record(r, best_val=2.0 - r['lr'] * 10 - r['dropout'] + (0.5 if r['lr'] > 0.01 else 0.0))
    plan, waiting = p.plan()  # 2.7e-2 is worse: the lr is interior now; dropout 0.3 is the edge again -> 0.4
    assert sorted({r['dropout'] for r in plan if r['stage'] == 'tune-extended'}) == [0.1, 0.2, 0.3, 0.4]
    for r in plan:
        if not os.path.exists(os.path.join(r['out_dir'], 'summary.json')) and r['stage'].startswith('tune'):
            fake_record(r, best_val=5.0)  # dropout 0.4 is worse: interior
    plan, waiting = p.plan()
    assert p.choices['vanilla'] == (9e-3, 0.3) and not waiting
    seeds = [r for r in plan if r['stage'] == 'seeds']
    assert [(r['lr'], r['dropout'], r['seed']) for r in seeds] == [(9e-3, 0.3, 1338), (9e-3, 0.3, 1339)]
    # the tuning seed's run at the choice is one of the seeds: planned once
    assert len({r['out_dir'] for r in plan}) == len(plan)
    for r in seeds:
        fake_record(r, best_val=1.0, test=1.2)
    report.bakeoff(str(tmp_path), preset='cpu')
    tuning = runtime.read_csv(str(tmp_path / 'tuning.csv'))
    assert [(r['lr'], r['dropout']) for r in tuning if r['chosen'] == 'True'] == [('0.009', '0.3')]
    assert {r['extended'] for r in tuning if r['lr'] == '0.027'} == {'True'}
    assert {r['extended'] for r in tuning if r['lr'] == '0.001' and r['dropout'] == '0.1'} == {'False'}
    row = runtime.read_csv(str(tmp_path / 'bakeoff.csv'))[0]
    assert (row['lr'], row['dropout'], row['n_seeds']) == ('0.009', '0.3', '3')


def test_shards_cover_every_run_exactly_once(tmp_path):
    opts = dict(preset='full', device='cpu', plan=True, controls=True, results_dir=str(tmp_path))
    full = [r['out_dir'] for r in train_runner.sweep(dict(opts))['plan']]
    assert len(full) == 4 * 3 + 5 * 3 == len(set(full))
    for n in (1, 2, 4, 7, 40):
        parts = [train_runner.shard_of(full, k, n) for k in range(n)]
        assert sorted(x for part in parts for x in part) == sorted(full)  # all of them, none twice
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    mine = train_runner.sweep({**opts, 'shard': '1/4'})['shard']  # what a sweep with --shard trains
    assert [r['out_dir'] for r in mine] == train_runner.shard_of(full, 1, 4)
    for bad in ('4/4', '-1/2', 'x', '1/0', '1'):
        with pytest.raises(ConfigError, match='--shard must be K/N'):
            train_runner.sweep({**opts, 'shard': bad})


def test_lm_runs_side_by_side_on_cpu_make_the_same_records(prepared, tmp_path, capsys):
    """--procs_per_gpu=2 without CUDA: the lm stage's runs two at a time, each a process with its share of the
    cores and its console output in <run>/train.log, with the numbers of the runs one after another."""
    opts = {**TINY, 'models': 'vanilla', 'seeds': 3, 'bench': False}
    one = train_runner.sweep({**opts, 'results_dir': str(tmp_path / 'one')})['runs']
    two = train_runner.sweep({**opts, 'results_dir': str(tmp_path / 'two'), 'procs_per_gpu': 2})['runs']
    assert 'training 3 runs, 2 at a time, each a process of' in capsys.readouterr().out
    assert [s['best_val_loss'] for s in one] == [s['best_val_loss'] for s in two] and len(two) == 3
    assert [s['test_loss'] for s in one] == [s['test_loss'] for s in two]
    assert all((tmp_path / 'two' / 'runs' / d / 'train.log').exists() for d in os.listdir(tmp_path / 'two' / 'runs'))


def test_the_eta_probe_runs_at_a_workers_share_of_the_cores(tmp_path, monkeypatch):
    """With runs side by side on CPU, the ETA's probe times a model at the threads each run will have."""
    seen = []
    monkeypatch.setattr(train_runner, '_probe', lambda c: seen.append(torch.get_num_threads()) or 1.0)
    monkeypatch.setattr(train_runner, '_cpu_threads', lambda workers: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for procs in (1, 2):
            train_runner.sweep({**TINY, 'max_iters': 80, 'models': 'vanilla', 'seeds': 1, 'plan': True,
                                'procs_per_gpu': procs, 'results_dir': str(tmp_path / str(procs))})
        assert seen == [2, 1] and torch.get_num_threads() == 2  # and the sweep's own threads restored
    finally:
        torch.set_num_threads(before)


def test_a_control_trains_only_with_its_parent_among_the_models(tmp_path, capsys):
    """`--models=nsa --controls` next to another sweep's `--models=vanilla,...`: vanilla's controls are not
    this sweep's (with --tune their parent's choice is the other sweep's tuning; config/bakeoff.py's
    untuned value would have trained them at the wrong cell)."""
    opts = dict(preset='full', device='cpu', plan=True, controls=True, results_dir=str(tmp_path))
    for tune in (False, True):
        nsa = train_runner.sweep({**opts, 'models': 'nsa', 'tune': tune})['plan']
        assert {r['name'] for r in nsa} == {'nsa'}
        assert capsys.readouterr().out.count('left out: control ') == 5
        van = train_runner.sweep({**opts, 'models': 'vanilla', 'tune': tune})['plan']
        assert {r['name'] for r in van if r['stage'] == 'control'} == \
            ({'vanilla+attn_dropout=0', 'vanilla+n_head=16+n_kv_head=1+head_dim=32+pos_emb=rope+d_ff=-1'}
             if not tune else set())  # with --tune they wait for vanilla's tuning
        assert capsys.readouterr().out.count('left out: control ') == 3


def test_a_record_from_before_the_test_split_is_not_a_done_run(tmp_path):
    """A committed run of the 90/10 split has the same config, but its val loss is of another split."""
    tuned, controls = train_runner.bakeoff_config('full')
    tuned = {**tuned, 'vanilla': (1e-3, 0.2)}  # that record's (lr, dropout): nanoGPT's recipe, before the tuning
    p = train_runner._Planner({**train_runner.SWEEP_KEYS, 'models': 'vanilla', 'seeds': 1}, {'device': 'cpu'},
                              train_runner.PRESETS['full'], 'full', str(tmp_path), tuned, controls)
    (run,), _ = p.plan()
    shutil.copytree(os.path.join(ROOT, 'results', 'full', 'runs', 'vanilla-lr0.001-s1337'), run['out_dir'])
    assert p.record(run) is None and run['same'] is False
    path = os.path.join(run['out_dir'], 'config.json')
    rec = json.load(open(path))
    rec['splits'] = {'train': 1_003_854, 'val': 55_770, 'test': 55_770}
    json.dump(rec, open(path, 'w'))
    p._resolved.clear()
    assert p.record(run)['status'] == 'done'  # otherwise the same run: its missing keys read as defaults


# ----------------------------------------------------------------------------- train(): validation selects

def test_the_test_split_never_reaches_selection(prepared, tmp_path, monkeypatch):
    """With the test loss made adversarial (best at iteration 0, when val is worst), the chosen checkpoint is
    the same as without: the test loss is measured once, on the checkpoint val chose, and only recorded."""
    run = {**TINY, 'model_type': 'vanilla', 'dropout': 0.0}
    honest = train_runner.train(None, {**run, 'out_dir': str(tmp_path / 'a')})
    assert {'test_loss', 'heldout_loss', 'train_loss_at_best'} <= set(honest)
    calls = []
    real = tasks.LMTask.evaluate

    def adversarial(self, model, autocast, desc='', splits=tasks.LMTask.SELECT_SPLITS):
        out = real(self, model, autocast, desc, splits)
        if 'test' in splits:
            it = int(desc.split()[-1])
            calls.append(it)
            out.update(test=1000.0 * it, heldout=1000.0 * it)  # the earliest checkpoint is the best on test
        assert 'test' not in splits or 'val' not in splits  # never measured where selection reads
        return out
    monkeypatch.setattr(tasks.LMTask, 'evaluate', adversarial)
    bad = train_runner.train(None, {**run, 'out_dir': str(tmp_path / 'b')})
    assert bad['best_iter'] == honest['best_iter'] > 0 and bad['best_val_loss'] == honest['best_val_loss']
    assert bad['test_loss'] == 1000.0 * bad['best_iter']  # recorded at the checkpoint chosen by val
    assert calls == [bad['best_iter']]  # once, on the chosen checkpoint
    evals = [json.loads(ln) for ln in open(tmp_path / 'b' / 'metrics.jsonl') if '"eval"' in ln]
    assert all('test_loss' not in e for e in evals)
    best = min(evals, key=lambda e: e['val_loss'])  # the checkpoint is the lowest val loss logged, nothing else
    assert (bad['best_iter'], bad['best_val_loss']) == (best['iter'], best['val_loss'])


def test_the_whole_last_tenth_is_val_then_test(prepared):
    t = tasks.LMTask({'dataset': 'shakespeare_char', 'block_size': 16, 'eval_iters': 1}, 'cpu', 4)
    assert len(t.data['heldout']) == 111_540 and (t.data['heldout'][:55_770] == t.data['val']).all()
    assert t.report_splits == ('test', 'heldout')


# ----------------------------------------------------------------------------- end to end

def test_a_tiny_tune_sweep_makes_tables_that_regenerate_byte_for_byte(prepared, tmp_path, monkeypatch):
    conf = tmp_path / 'bakeoff.py'
    conf.write_text("tuned = {'cpu': {'vanilla': (1e-3, 0.0)}}\ncontrols = ['vanilla+attn_dropout=0']\n")
    monkeypatch.setattr(train_runner, 'BAKEOFF_CONFIG', str(conf))
    monkeypatch.setattr(train_runner, 'LR_BOUNDS', (1e-3, 3e-3))  # a 2 x 2 grid with nowhere to extend
    monkeypatch.setattr(train_runner, 'DROPOUT_BOUNDS', (0.0, 0.1))
    out = tmp_path / 'res'
    res = train_runner.sweep({**TINY, 'max_iters': 4, 'models': 'vanilla', 'tune': True, 'controls': True,
                              'lrs': '1e-3,3e-3', 'dropouts': '0,0.1', 'seeds': 2, 'bench': False,
                              'results_dir': str(out)})
    assert len(res['runs']) == 4 + 1 + 2 and not res['waiting'] and set(res['choices']) == {'vanilla'}
    lr, d = res['choices']['vanilla']
    report.bakeoff(str(out), preset='cpu-custom')
    tuning = runtime.read_csv(str(out / 'tuning.csv'))
    assert len(tuning) == 4 and list(tuning[0])[:8] == ['model', 'lr', 'dropout', 'seed', 'best_val_loss',
                                                        'best_iter', 'test_loss', 'train_loss_at_best']
    rows = runtime.read_csv(str(out / 'bakeoff.csv'))
    assert [r['model'] for r in rows] == ['vanilla', 'vanilla+attn_dropout=0']  # the name as written
    assert all(r['n_seeds'] == '2' and (r['lr'], r['dropout']) == (f'{lr:g}', f'{d:g}') for r in rows)
    assert rows[0]['delta_vs_vanilla'] == '-' and rows[1]['significant'] in ('True', 'False')
    assert float(rows[1]['ci95_low']) <= float(rows[1]['delta_vs_vanilla']) <= float(rows[1]['ci95_high'])
    contrast, = runtime.read_csv(str(out / 'contrasts.csv'))  # config/bakeoff.py's: the control against vanilla
    assert (contrast['model'], contrast['against'], contrast['n_seeds']) == ('vanilla+attn_dropout=0', 'vanilla', '2/2')
    assert contrast['diff'] == rows[1]['delta_vs_vanilla'] and contrast['significant'] == rows[1]['significant']
    files = {f: (out / f).read_bytes() for f in ('bakeoff.csv', 'tuning.csv', 'bakeoff_curves.csv',
                                                  'bakeoff.meta.json', 'contrasts.csv')}
    report.bakeoff(str(out), preset='cpu-custom')
    assert {f: (out / f).read_bytes() for f in files} == files
    md = open(report.report(str(out))).read()
    assert 'vanilla+attn_dropout=0' in md and 'Tuning grid' in md and 'each against the model it isolates' in md
    again = train_runner.sweep({**TINY, 'max_iters': 4, 'models': 'vanilla', 'tune': True, 'controls': True,
                                'lrs': '1e-3,3e-3', 'dropouts': '0,0.1', 'seeds': 2, 'bench': False,
                                'results_dir': str(out)})
    assert [s['out_dir'] for s in again['runs']] == [s['out_dir'] for s in res['runs']]  # all done: kept


def test_the_prose_claims_an_order_only_where_significant():
    rows = [dict(model='vanilla'),
            dict(model='delta', significant='True', delta_vs_vanilla='+0.0500', ci95_low='+0.0200',
                 ci95_high='+0.0800', n_seeds='3', matched='yes'),
            dict(model='nsa', significant='False', delta_vs_vanilla='-0.0100', ci95_low='-0.0300',
                 ci95_high='+0.0100', n_seeds='3', matched='yes'),
            dict(model='delta_product+d_ff=1536', significant='-', delta_vs_vanilla='-0.0100', ci95_low='-',
                 ci95_high='-', n_seeds='1', matched='not matched (+2.65M)')]
    lines = report.bakeoff_prose(rows)
    assert lines[0].startswith('- delta: test loss higher than vanilla') and 'lower' not in lines[1]
    assert 'not distinguishable here' in lines[1] and 'not distinguishable here' in lines[2]
    assert 'not matched (+2.65M)' in lines[2]


def test_each_control_is_read_against_what_it_isolates():
    rows = [dict(model='nsa', against='twin', differs='sparsity', n_seeds='3/3', diff='+0.0373', ci95_low='+0.0125',
                 ci95_high='+0.0621', significant='True'),
            dict(model='delta+allow_neg_eigval=True', against='delta', differs='beta in (0, 2)', n_seeds='3/3',
                 diff='-0.0218', ci95_low='-0.0670', ci95_high='+0.0235', significant='False')]
    lines = report.contrasts_prose(rows)
    assert lines[0].startswith("- nsa (sparsity): test loss higher than twin's by +0.0373")
    assert 'not distinguishable here from delta' in lines[1] and 'lower' not in lines[1]
    names = {m for c in report.bakeoff_contrasts() for m in c[:2]}  # every name is a model or a control
    assert names <= set(train_runner.bakeoff_config('full')[1]) | set(report.model.MODEL_TYPES)
