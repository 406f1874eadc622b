"""Records after a fault. A run is killed at a chosen point (train_runner's FAULT_AT test hook: os._exit in a
process of its own, as kill -9 would), then resumed; its records must be those of the run that was never
interrupted: the same metrics.jsonl rows (timing fields aside), the same summary, its times summed over the
segments."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train_runner
from conftest import ROOT

RUN = dict(model_type='vanilla', n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, dropout=0.0,
           device='cpu', compile=False, eval_iters=2, eval_batch_size=32, eval_interval=4, log_interval=2,
           max_iters=8, lr_decay_iters=8, warmup_iters=2)
TIMING = {'ms_per_iter', 'mfu', 'time_s'}  # the fields that differ between any two runs
SAME = ('best_val_loss', 'best_iter', 'final_train_loss', 'final_val_loss', 'iters', 'n_params', 'status',
        'model_type', 'learning_rate', 'seed', 'compile', 'cuda_graphs')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # the killed process runs with OMP_NUM_THREADS=1: the same thread count here keeps the sums bit-identical
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def killed(out_dir, point, **over):
    """train() in a process of its own, ended by the FAULT_AT hook at `point` (e.g. 'after_ckpt:iter=4')."""
    cfg = {**RUN, **over, 'out_dir': str(out_dir)}
    r = subprocess.run([sys.executable, 'train_runner.py', *(f'--{k}={v}' for k, v in cfg.items())], cwd=ROOT,
                       env={**os.environ, 'FAULT_AT': point, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # the hook's exit, not an error
    return r


def resume(out_dir, **over):
    return train_runner.train(None, {**RUN, **over, 'out_dir': str(out_dir), 'init_from': 'resume'})


@pytest.fixture(scope='module')
def full(prepared, tmp_path_factory):
    """The uninterrupted run: its folder and summary."""
    out = tmp_path_factory.mktemp('full')
    return out, train_runner.train(None, {**RUN, 'out_dir': str(out)})


def test_resume_keeps_the_first_log_row_after_it(full, tmp_path, capsys):
    part = tmp_path / 'part'
    train_runner.train(None, {**RUN, 'out_dir': str(part), 'max_iters': 4})
    capsys.readouterr()
    resume(part)
    assert 'iter 6/8' in capsys.readouterr().out  # the console, too
    assert rows(part) == rows(full[0])


def test_a_kill_right_after_a_checkpoint_loses_no_eval_row(full, tmp_path):
    part = tmp_path / 'part'
    killed(part, 'after_ckpt:iter=4')
    s = resume(part)
    got, want = rows(part), rows(full[0])
    assert [r for r in got if r['kind'] == 'eval'] == [r for r in want if r['kind'] == 'eval']
    assert got == want
    # the report splits, measured once on the chosen checkpoint after the resumed segment: the same numbers
    keys = ('best_iter', 'best_val_loss', 'train_loss_at_best', 'test_loss', 'heldout_loss')
    assert {k: s[k] for k in keys} == {k: full[1][k] for k in keys}


def test_a_kill_right_before_a_checkpoint_repeats_no_row(full, tmp_path):
    part = tmp_path / 'part'
    killed(part, 'before_ckpt:iter=8')  # the last checkpoint is iteration 4's
    resume(part)
    assert rows(part) == rows(full[0])


def test_a_kill_between_the_final_checkpoint_and_the_summary(full, tmp_path):
    part = tmp_path / 'part'
    killed(part, 'after_ckpt:iter=8')
    assert not (part / 'summary.json').exists()
    s = resume(part)
    ref = full[1]
    assert {k: s[k] for k in SAME} == {k: ref[k] for k in SAME}
    assert math.isfinite(s['median_ms_per_iter']) and s['median_ms_per_iter'] > 0
    assert s['tokens_per_s'] is not None and s['tokens_per_s'] > 0
    assert json.load(open(part / 'summary.json'))['final_val_loss'] == ref['final_val_loss']
    assert rows(part) == rows(full[0])


def test_resuming_a_finished_run_changes_nothing(full, tmp_path, capsys):
    done = tmp_path / 'done'
    shutil.copytree(full[0], done)
    before = {f: (done / f).read_bytes() for f in ('summary.json', 'metrics.jsonl', 'config.json')}
    capsys.readouterr()
    s = resume(done)
    assert 'already finished' in capsys.readouterr().out
    assert {f: (done / f).read_bytes() for f in before} == before
    assert s == json.loads(before['summary.json'])


def test_wall_and_train_time_add_up_over_segments(prepared, tmp_path):
    long = dict(max_iters=30, eval_interval=6, lr_decay_iters=30)
    ref = train_runner.train(None, {**RUN, **long, 'out_dir': str(tmp_path / 'full')})
    part = tmp_path / 'part'
    t0 = time.time()
    killed(part, 'after_ckpt:iter=24', **long)
    s = resume(part, **long)
    both = time.time() - t0
    # the resumed segment trained 6 of the 30 iterations: on its own it would be about a quarter of the run
    for k in ('wall_s', 'train_s'):
        assert 0.6 * ref[k] < s[k] < both, (k, s[k], ref[k], both)
    assert s['segments'] == 2 and ref['segments'] == 1
