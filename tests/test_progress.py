"""Progress and ETAs, and the sweep's console log: a run's ETA counts the evaluations to come, the sweep
estimates each run from its own model's speed, and everything a sweep prints lands in <results_dir>/sweep.log."""
import sys

import pytest
import torch

import train_runner

TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, dropout=0.0, device='cpu',
            compile=False, eval_batch_size=32, warmup_iters=2)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_runs_eta_counts_the_evaluations_to_come():
    # after 10 of 20 iterations at 0.1 s, evals at 10 and 20 still to come, 3 s each so far
    assert train_runner.run_eta(0.1, 10, 20, 10, eval_s=6.0, n_evals=2) == pytest.approx(1.0 + 2 * 3.0)
    assert train_runner.run_eta(0.1, 11, 20, 10, eval_s=6.0, n_evals=2) == pytest.approx(0.9 + 3.0)
    assert train_runner.run_eta(0.1, 21, 25, 10, eval_s=6.0, n_evals=2) == pytest.approx(0.4 + 3.0)  # the last
    assert train_runner.run_eta(0.1, 5, 20, 10, eval_s=0.0, n_evals=0) == pytest.approx(1.5)  # none timed yet


def test_the_sweep_estimates_each_run_from_its_own_models_speed():
    eta = train_runner._SweepEta()
    eta.probe.update(vanilla=10.0, nsa=50.0)
    assert eta.left(['vanilla', 'nsa']) == 60.0  # the probes, before any run finished
    eta.add('vanilla', 20.0)  # the runs take twice what the probes said: so will nsa's
    assert eta.run('vanilla') == 20.0 and eta.run('nsa') == 100.0
    assert eta.left(['vanilla', 'nsa', 'nsa']) == 220.0  # not 3 x the mean of the finished runs (60)
    eta.add('nsa', 80.0)
    assert eta.run('nsa') == 80.0  # measured beats scaled
    assert train_runner._SweepEta().left(['vanilla']) is None  # nothing known: no number


def test_parallel_runs_start_longest_first():
    eta = train_runner._SweepEta()
    eta.probe.update(vanilla=10.0, delta=30.0, nsa=20.0)
    todo = [({'name': m, 'seed': s}, {}) for m in ('vanilla', 'delta', 'nsa', 'other') for s in (1, 2)]
    order = [(r['name'], r['seed']) for r, _ in train_runner._longest_first(todo, eta)]
    assert order == [('delta', 1), ('delta', 2), ('nsa', 1), ('nsa', 2), ('vanilla', 1), ('vanilla', 2),
                     ('other', 1), ('other', 2)]  # 'other': no probe, the mean of nothing measured: last


def test_a_resumed_sweep_estimates_from_the_records_of_this_device(tmp_path):
    """Finished runs of an earlier sweep on the same device are the estimate before any probe: runs trained in
    one piece only (a resumed run's segments each paid their own start-up), each record counted once however
    often the sweep plans again; and they scale the probe of a model new to the sweep."""
    import json
    def record(name, device, wall_s, segments=1):
        d = tmp_path / name
        d.mkdir()
        (d / 'config.json').write_text(json.dumps({'device': device}))
        return str(d), {'status': 'done', 'wall_s': wall_s, 'segments': segments}
    eta = train_runner._SweepEta()
    for name, device, wall, seg in (('a', 'NVIDIA H200', 40.0, 1), ('b', 'NVIDIA H200', 60.0, 1),
                                    ('c', 'NVIDIA A100', 500.0, 1), ('d', 'NVIDIA H200', 5.0, 2)):
        out_dir, summary = record(name, device, wall, seg)
        eta.from_record('delta', out_dir, summary, 'NVIDIA H200')
        eta.from_record('delta', out_dir, summary, 'NVIDIA H200')  # planned again: not counted twice
    assert eta.known('delta') and not eta.known('nsa')
    assert eta.run('delta') == 50.0  # a and b: not the other device's run, nor the resumed one's part
    eta.probe['delta'] = 700.0  # an eager probe does not override what was measured
    assert eta.left(['delta', 'delta']) == 100.0
    assert eta.source('delta') == 'its recorded runs on this device'
    eta.probe['nsa'] = 1400.0  # a model new to the resumed sweep: its eager probe, scaled by delta's records
    assert eta.scaled() and eta.run('nsa') == 1400.0 * 50.0 / 700.0
    assert 'scaled' in eta.source('nsa') and 'unscaled' not in eta.source('nsa')
    eta.add('delta', 30.0)
    assert eta.run('delta') == 30.0 and eta.source('delta') == 'its runs in this sweep'  # this sweep's own first
    assert train_runner._SweepEta().source('vanilla') == 'nothing measured yet'


def test_the_probe_estimates_a_run_with_heavy_evaluations(prepared, tmp_path):
    # evaluation takes most of this run (9 evals of 2 x 8 batches and the checkpoints, then 2 x 8 batches of the
    # report splits, against 40 small steps): the estimate must count all of it
    import time
    run = {**TINY, 'model_type': 'vanilla', 'max_iters': 40, 'eval_interval': 5, 'eval_iters': 8,
           'log_interval': 10, 'out_dir': str(tmp_path / 'run')}
    est = train_runner._probe(run)
    t0 = time.time()
    train_runner.train(None, run)
    actual = time.time() - t0
    assert 0.5 < est / actual < 2.0, (est, actual)


def test_a_sweep_writes_everything_it_prints_to_sweep_log(prepared, tmp_path, monkeypatch, capsys):
    real_train = train_runner.train

    def train(config_file, overrides):
        sys.stderr.write('bar 1/2\rbar 2/2\n')  # a progress bar redrawing its line, on stderr
        sys.stderr.write('a warning\n')
        return real_train(config_file, overrides)
    monkeypatch.setattr(train_runner, 'train', train)
    opts = dict(models='vanilla', lrs='1e-3', seeds=1, bench=False, results_dir=str(tmp_path), max_iters=2, eval_iters=1,
                device='cpu')
    train_runner.sweep(dict(opts))
    assert not isinstance(sys.stdout, train_runner._Tee) and not isinstance(sys.stderr, train_runner._Tee)
    log = (tmp_path / 'sweep.log').read_text()
    assert log.startswith('===== ') and 'train_runner.sweep(' in log.splitlines()[0]
    for line in ('reproduction: preset', '=== run 1/1: vanilla', 'step 2: train loss', 'done: best val loss',
                 'a warning', 'reproduction finished'):
        assert line in log, line
    assert '\nbar 2/2\n' in log and 'bar 1/2' not in log and '\r' not in log  # the bar's last state only
    assert 'reproduction finished' in capsys.readouterr().out  # the console still gets it all

    monkeypatch.setattr(train_runner, 'train', lambda *a: (_ for _ in ()).throw(RuntimeError('broken run')))
    with pytest.raises(RuntimeError):
        train_runner.sweep({**opts, 'max_iters': 3})  # a changed config: trains again, and fails
    log = (tmp_path / 'sweep.log').read_text()
    assert log.count('\n===== ') == 1  # appended: the second sweep's header
    assert log.rstrip().endswith('RuntimeError: broken run')  # how it ended, traceback included


def test_the_evaluation_shows_progress_in_a_log(prepared, tmp_path, monkeypatch, capsys):
    # not a terminal (a log file, a pipe): plain lines, here one per batch (every=0), with the phase's ETA
    import functools
    import runtime
    import tasks  # the LM task runs the evaluation, with its progress
    monkeypatch.setattr(tasks, 'Progress', functools.partial(runtime.Progress, every=0.0))
    train_runner.train(None, {**TINY, 'model_type': 'vanilla', 'max_iters': 2, 'eval_interval': 2, 'eval_iters': 2,
                              'log_interval': 1, 'out_dir': str(tmp_path)})
    out = capsys.readouterr().out
    assert 'eval at iter 0: 1/4, ' in out and 'eval at iter 2: 3/4, ' in out and ', eta ' in out
    assert '\r' not in out


def test_a_sweep_records_its_wall_time_per_stage_and_whether_it_was_the_whole_reproduction(prepared, tmp_path):
    """<results_dir>/reproduction.json: the command's wall time, each stage's, the runs it trained and found done;
    `uninterrupted` only when this command trained every planned run itself (a rerun that finds them done is
    not a timing of the reproduction)."""
    import json
    opts = dict(models='vanilla,delta', lrs='1e-3', seeds=1, bench=False, results_dir=str(tmp_path), max_iters=2,
                eval_iters=1, device='cpu')
    out = train_runner.sweep(dict(opts))
    rec = json.loads((tmp_path / 'reproduction.json').read_text())
    assert set(rec) >= {'wall_s', 'stages', 'runs', 'uninterrupted', 'commit', 'device', 'command', 'date'}
    assert set(rec['stages']) == {'lm'} and 0 < rec['stages']['lm'] <= rec['wall_s'] <= out['wall_s'] + 0.1
    assert rec['runs'] == {'lm': {'trained': 2, 'already_done': 0, 'resumed': 0}} and rec['uninterrupted'] is True
    train_runner.sweep({**opts, 'bench': True})  # everything is done: nothing trains, and the record says so
    rec = json.loads((tmp_path / 'reproduction.json').read_text())
    assert rec['runs'] == {'lm': {'trained': 0, 'already_done': 2, 'resumed': 0}} and rec['uninterrupted'] is False
    assert set(rec['stages']) == {'lm', 'benchmarks'} and {'params', 'memory', 'report'} <= set(rec['benchmark_steps'])
    assert sum(rec['benchmark_steps'].values()) <= rec['stages']['benchmarks']
