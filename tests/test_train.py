"""train_runner: learning, exact resume, checkpoint safety, NaN handling, config validation."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import model as model_lib
import train_runner
from conftest import ROOT

TINY_RUN = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32, dropout=0.0, device='cpu',
                eval_iters=4, eval_batch_size=64, log_interval=25, compile=False)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_learns_under_a_minute(prepared, tmp_path):
    # one thread: a tiny model gains nothing from more, and spinning threads stall on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    s = train_runner.train(None, {**TINY_RUN, 'out_dir': str(tmp_path), 'max_iters': 400, 'eval_interval': 100,
                                  'learning_rate': 3e-3, 'warmup_iters': 20})
    wall = time.time() - t0
    torch.set_num_threads(threads)
    assert wall < 60, f"{wall:.0f}s"
    assert s['best_val_loss'] < 2.3  # a uniform guess is ln(65) = 4.17, a bigram model ~2.5
    for f in ('config.json', 'metrics.jsonl', 'summary.json', 'ckpt_best.pt', 'ckpt_last.pt'):
        assert os.path.exists(tmp_path / f), f
    rec = json.load(open(tmp_path / 'config.json'))
    assert rec['n_params'] == s['n_params'] and rec['config']['model_type'] == 'vanilla'
    assert {'git_commit', 'device', 'versions'} <= set(rec) and 'torch' in rec['versions']
    evals = [r for r in read_metrics(tmp_path) if r['kind'] == 'eval']
    assert [r['iter'] for r in evals] == [0, 100, 200, 300, 400]
    # the best checkpoint holds the best val loss, never a later worse one
    best = torch.load(tmp_path / 'ckpt_best.pt', weights_only=False)
    assert best['val_loss'] == min(r['val_loss'] for r in evals) == s['best_val_loss']


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA')])])
def test_resume_is_exact(prepared, tmp_path, device):
    """k iterations, stop, resume to k+m == k+m uninterrupted: identical parameters (data RNG and dropout RNG
    are restored too, so dropout is on here). On CUDA the checkpoint loads onto the GPU, RNG states included
    (a resume once failed there only)."""
    common = {**TINY_RUN, 'dropout': 0.1, 'eval_interval': 10, 'lr_decay_iters': 30, 'seed': 7, 'device': device,
              'compile': False, 'cuda_graphs': False}
    full = tmp_path / 'full'
    train_runner.train(None, {**common, 'out_dir': str(full), 'max_iters': 30})
    part = tmp_path / 'part'
    train_runner.train(None, {**common, 'out_dir': str(part), 'max_iters': 20})
    s = train_runner.train(None, {**common, 'out_dir': str(part), 'max_iters': 30, 'init_from': 'resume'})
    assert s['iters'] == 30
    a = torch.load(full / 'ckpt_last.pt', weights_only=False)
    b = torch.load(part / 'ckpt_last.pt', weights_only=False)
    assert a['iter_num'] == b['iter_num'] == 30
    for k in a['model']:  # CUDA: atomics in some backward kernels may reorder sums
        assert torch.equal(a['model'][k], b['model'][k]) if device == 'cpu' else \
            torch.allclose(a['model'][k], b['model'][k], rtol=1e-4, atol=1e-6), k
    assert [r['iter'] for r in read_metrics(part) if r['kind'] == 'eval'] == [0, 10, 20, 30]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    import model as model_lib
    orig = model_lib.GPT.forward
    calls = {'n': 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = orig(self, idx, targets, **kw)
        if self.training:
            calls['n'] += 1
            if calls['n'] > 25:  # after the checkpoint at iteration 20
                loss = loss * float('nan')
        return logits, loss
    monkeypatch.setattr(model_lib.GPT, 'forward', poisoned)
    with pytest.raises(train_runner.NonFiniteLoss, match='last good checkpoint'):
        train_runner.train(None, {**TINY_RUN, 'out_dir': str(tmp_path), 'max_iters': 100, 'eval_interval': 20,
                                  'log_interval': 5})
    ck = torch.load(tmp_path / 'ckpt_last.pt', weights_only=False)
    assert ck['iter_num'] == 20
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


@pytest.mark.skipif(not (sys.platform.startswith('linux') and os.confstr('CS_GNU_LIBC_VERSION')),
                    reason="glibc's mallopt: Linux with glibc only")
def test_cpu_training_keeps_freed_memory(prepared, tmp_path, monkeypatch):
    """train() on CPU sets glibc's thresholds once per run (runtime.keep_freed_memory; mallopt accepts both
    values here)."""
    import runtime
    assert runtime.keep_freed_memory() is True
    calls = []
    monkeypatch.setattr(train_runner, 'keep_freed_memory', lambda: calls.append(1))
    train_runner.train(None, {**TINY_RUN, 'max_iters': 2, 'eval_interval': 2, 'out_dir': str(tmp_path)})
    assert calls == [1]


def test_unknown_key_and_model_type_fail_clearly():
    with pytest.raises(ValueError, match="unknown key.*'n_layers'.*valid keys"):
        train_runner.resolve_config(None, {'n_layers': 4})
    with pytest.raises(ValueError, match='valid choices: vanilla, delta, delta_product, nsa'):
        train_runner.resolve_config(None, {'model_type': 'rwkv'})
    with pytest.raises(ValueError, match='config file .* not found'):
        train_runner.resolve_config('config/nope.py')


def test_model_keys_follow_model_type():
    cfg = train_runner.resolve_config(os.path.join(ROOT, 'config', 'train_shakespeare_char.py'), {'max_iters': 7})
    assert cfg['max_iters'] == 7 and cfg['model_type'] == 'vanilla' and cfg['n_embd'] == 384
    with pytest.raises(ValueError, match='unknown key'):  # a DeltaNet key is not a vanilla key
        train_runner.resolve_config(None, {'conv_size': 4})


def test_cli_overrides_parse():
    f, o = train_runner.parse_cli(['config/x.py', '--max_iters=2', '--wandb_log=False', '--model_type=delta',
                                   '--learning_rate=3e-3'])
    assert f == 'config/x.py' and o == {'max_iters': 2, 'wandb_log': False, 'model_type': 'delta',
                                         'learning_rate': 3e-3}
    assert train_runner.parse_cli(['--tune', '--controls'])[1] == {'tune': True, 'controls': True}  # bare flag: True
    with pytest.raises(ValueError, match='max_iters must be an int'):  # ConfigError is a ValueError
        train_runner.resolve_config(None, train_runner.parse_cli(['--max_iters'])[1])


def test_cli_error_exits_nonzero_with_message():
    r = subprocess.run([sys.executable, 'train_runner.py', 'config/train_shakespeare_char.py', '--bogus=1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'unknown key' in r.stderr and 'valid keys' in r.stderr


# the bake-off's configs (parameter-matched); the task configs (mqar.py, state_tracking.py): tests/test_tasks.py
@pytest.mark.parametrize('config', sorted(c for c in os.listdir(os.path.join(ROOT, 'config')) if c.startswith('train_')))
def test_shipped_configs_resolve_and_match_params(config):
    import model as model_lib
    cfg = train_runner.resolve_config(os.path.join(ROOT, 'config', config))
    mkeys = train_runner.model_keys(cfg['model_type'])
    m = model_lib.build_model(cfg['model_type'], **{k: cfg[k] for k in mkeys if k != 'model_type'})
    assert abs(m.get_num_params(False) - 10_745_088) / 10_745_088 < 0.03


def test_ddp_gloo_matches_single_process(prepared, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 2 x 16 split across ranks, against one process with
    2 micro-steps of 16: same global batch, same schedule. The ranks sample their own data streams
    (per-rank seed offset, as nanoGPT does), so the runs see different batches: the losses agree
    statistically, not bit for bit. Tolerance: 0.05 nats of val loss after 150 iterations."""
    common = ['--n_layer=2', '--n_head=4', '--n_embd=64', '--block_size=64', '--batch_size=16',
              '--gradient_accumulation_steps=2', '--dropout=0.0', '--device=cpu', '--compile=False',
              '--eval_iters=8', '--eval_batch_size=64', '--max_iters=150', '--eval_interval=150',
              '--learning_rate=3e-3', '--warmup_iters=10', '--log_interval=50']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    single = subprocess.run([sys.executable, 'train_runner.py', 'config/train_shakespeare_char.py', *common,
                             f'--out_dir={tmp_path / "single"}'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'train_runner.py', 'config/train_shakespeare_char.py', *common,
                          f'--out_dir={tmp_path / "ddp"}'], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    # on failure show the ranks' own error lines (torchrun's summary at the end hides them) and the tail
    errors = [ln for ln in ddp.stderr.splitlines() if any(w in ln for w in ('Error', 'terminate', 'what()', 'rank'))]
    assert ddp.returncode == 0, '\n'.join(errors[:40]) + '\n...\n' + ddp.stderr[-1500:]
    a = json.load(open(tmp_path / 'single' / 'summary.json'))
    b = json.load(open(tmp_path / 'ddp' / 'summary.json'))
    assert a['iters'] == b['iters'] == 150
    rec = json.load(open(tmp_path / 'ddp' / 'config.json'))
    assert rec['world_size'] == 2
    print(f"val loss: single {a['final_val_loss']:.4f}, ddp {b['final_val_loss']:.4f}")
    assert abs(a['final_val_loss'] - b['final_val_loss']) < 0.05
    assert a['final_val_loss'] < 2.6  # both learned something


def test_wandb_mirrors_the_local_metrics(prepared, tmp_path, monkeypatch):
    """wandb is optional and never installed in CI: a stand-in module records what train() sends, which
    must be the same rows as metrics.jsonl (local files stay the record)."""
    import types
    logged, inits = [], []

    class Run:
        summary = {}

        def log(self, row, step=None):
            logged.append((step, row))

        def finish(self):
            pass
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or Run())
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    train_runner.train(None, {**TINY_RUN, 'out_dir': str(tmp_path), 'max_iters': 20, 'eval_interval': 10,
                              'log_interval': 5, 'wandb_log': True, 'wandb_run_name': 'unit'})
    assert inits and inits[0]['name'] == 'unit' and inits[0]['config']['model_type'] == 'vanilla'
    local = read_metrics(tmp_path)
    assert [s for s, _ in logged] == [r['iter'] for r in local]
    assert [row for _, row in logged] == [{k: v for k, v in r.items() if k != 'kind'} for r in local]


def test_wandb_off_by_default():
    assert train_runner.DEFAULTS['wandb_log'] is False


def test_sweep_is_resumable(prepared, tmp_path):
    """Finished runs with the same config are not trained again, for every model type (a solved d_ff in the
    record must not look like a different config)."""
    opts = dict(models='vanilla,delta,delta_product,nsa', lrs='1e-3', seeds=1, bench=False, results_dir=str(tmp_path),
                max_iters=2, eval_iters=1, device='cpu')
    first = train_runner.sweep(dict(opts))
    stamps = {r['out_dir']: os.path.getmtime(os.path.join(r['out_dir'], 'summary.json')) for r in first['runs']}
    assert len(stamps) == 4
    second = train_runner.sweep(dict(opts))
    assert {r['out_dir']: os.path.getmtime(os.path.join(r['out_dir'], 'summary.json'))
            for r in second['runs']} == stamps
    third = train_runner.sweep({**opts, 'max_iters': 3, 'models': 'vanilla'})  # a changed config does retrain
    assert third['runs'][0]['iters'] == 3


def test_values_are_type_checked():
    assert train_runner.parse_cli(['--compile=false', '--decay_lr=True'])[1] == {'compile': False, 'decay_lr': True}
    assert train_runner.resolve_config(None, {'learning_rate': 1})['learning_rate'] == 1.0
    for bad in ({'batch_size': 64.5}, {'decay_lr': 'no'}, {'dtype': 'float16'}, {'device': 'gpu'}):
        with pytest.raises(ValueError):
            train_runner.resolve_config(None, bad)


def test_resume_refuses_a_changed_config(prepared, tmp_path):
    run = {**TINY_RUN, 'out_dir': str(tmp_path), 'eval_interval': 5}
    train_runner.train(None, {**run, 'max_iters': 5})
    with pytest.raises(ValueError, match='different config.*n_layer'):
        train_runner.train(None, {**run, 'max_iters': 10, 'n_layer': 3, 'init_from': 'resume'})
    s = train_runner.train(None, {**run, 'max_iters': 10, 'init_from': 'resume'})  # longer is fine
    assert s['iters'] == 10


def test_scratch_start_clears_an_earlier_runs_files(prepared, tmp_path, monkeypatch):
    run = {**TINY_RUN, 'out_dir': str(tmp_path), 'eval_interval': 5}
    train_runner.train(None, {**run, 'max_iters': 5})
    assert (tmp_path / 'summary.json').exists() and (tmp_path / 'ckpt_last.pt').exists()
    import model as model_lib
    orig = model_lib.GPT.forward

    def crash_in_training(self, *a, **k):
        if self.training:
            raise KeyboardInterrupt  # killed right after starting
        return orig(self, *a, **k)
    monkeypatch.setattr(model_lib.GPT, 'forward', crash_in_training)
    with pytest.raises(KeyboardInterrupt):
        train_runner.train(None, {**run, 'max_iters': 8, 'learning_rate': 2e-3})
    assert not (tmp_path / 'summary.json').exists()  # the old summary can't pass for this run's
    assert not (tmp_path / 'ckpt_last.pt').exists()


def test_eval_only_resume_evaluates_and_keeps_the_summary(prepared, tmp_path):
    run = {**TINY_RUN, 'out_dir': str(tmp_path), 'eval_interval': 5, 'max_iters': 5}
    s = train_runner.train(None, run)
    e = train_runner.train(None, {**run, 'init_from': 'resume', 'eval_only': True})
    assert abs(e['final_val_loss'] - s['final_val_loss']) < 1e-6  # the same weights, the same eval windows
    assert json.load(open(tmp_path / 'summary.json'))['iters'] == 5


def test_best_checkpoint_exists_even_if_iteration_0_is_best(prepared, tmp_path):
    s = train_runner.train(None, {**TINY_RUN, 'out_dir': str(tmp_path), 'max_iters': 2, 'eval_interval': 2,
                                  'learning_rate': 0.0})
    assert (tmp_path / 'ckpt_best.pt').exists() and s['best_iter'] in (0, 2)


def test_sweep_records_a_diverged_run_and_goes_on(prepared, tmp_path, monkeypatch):
    orig = train_runner.get_lr
    monkeypatch.setattr(train_runner, 'get_lr',
                        lambda it, cfg: float('nan') if cfg['learning_rate'] == 3e-3 else orig(it, cfg))
    opts = dict(models='vanilla', lrs='1e-3,3e-3', seeds=1, bench=False, results_dir=str(tmp_path), max_iters=4,
                eval_iters=1, log_interval=2, device='cpu')
    out = train_runner.sweep(dict(opts))
    assert [r['status'] for r in out['runs']] == ['done', 'diverged']
    again = train_runner.sweep(dict(opts))  # finished and diverged runs are both skipped
    assert [r['status'] for r in again['runs']] == ['done', 'diverged']
    with pytest.raises(ValueError, match='the sweep sets'):
        train_runner.sweep({'learning_rate': 1e-3})


def test_sweep_gpus_option_is_checked(tmp_path):
    opts = dict(models='vanilla', lrs='1e-3', bench=False, results_dir=str(tmp_path), max_iters=2, device='cpu')
    with pytest.raises(ValueError, match=r'--gpus=2 but this machine has 0 CUDA GPU\(s\)'):
        train_runner.sweep({**opts, 'gpus': 2})
    with pytest.raises(ValueError, match='gpus must be >= 1'):
        train_runner.sweep({**opts, 'gpus': 0})


def test_a_sweep_worker_logs_to_its_run_folder(prepared, tmp_path):
    out = tmp_path / 'run'
    s = train_runner._sweep_run({**TINY_RUN, 'out_dir': str(out), 'max_iters': 2, 'eval_interval': 2}, True)
    assert s['status'] == 'done'
    assert 'done: best val loss' in (out / 'train.log').read_text()


def test_sweep_worker_takes_the_gth_of_the_visible_gpus(monkeypatch):
    class Queue:
        def get(self):
            return 1
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,3')
    train_runner._pin_gpu(Queue())
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '3'  # the user's choice of GPUs is kept
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    train_runner._pin_gpu(Queue())
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '1'

    class NoGPU:  # a CPU worker: no GPU to pin, its share of the cores
        def get(self):
            return None
    before = torch.get_num_threads()
    try:
        train_runner._pin_gpu(NoGPU(), cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert train_runner._cpu_threads(1) >= 1 and train_runner._cpu_threads(10 ** 6) == 1
    assert model_lib.first_line(AssertionError()) == ''  # a message-less error can be reported


def test_cuda_graphs_need_cuda(prepared, tmp_path):
    with pytest.raises(ValueError, match='cuda_graphs=True needs a CUDA device'):
        train_runner.train(None, {**TINY_RUN, 'out_dir': str(tmp_path), 'max_iters': 2, 'cuda_graphs': True})


# ----------------------------------------------------------------------------- CUDA: graphs, multi-GPU sweep

GPU_RUN = dict(n_layer=2, batch_size=16, gradient_accumulation_steps=2, max_iters=30, eval_interval=30,
               log_interval=10, eval_iters=2, dropout=0.0, warmup_iters=5, device='cuda', compile=False)


@pytest.mark.cuda
@pytest.mark.parametrize('model_type', ['vanilla', 'delta', 'delta_product', 'nsa'])
def test_cuda_graph_step_equals_eager_step(model_type):
    """One replayed micro-step == one eager micro-step on the same weights, for two different batches
    (a replay must read the new inputs) and with accumulation (the second replay adds to the first's
    gradients): loss and every parameter's gradient, same bf16 kernels, so within 1% relative RMS."""
    torch.manual_seed(0)
    kw = dict(n_layer=2, dropout=0.0)
    m = model_lib.build_model(model_type, **kw).cuda()
    ac = torch.autocast('cuda', dtype=torch.bfloat16)
    X1, Y1, X2, Y2 = (torch.randint(65, (8, 256), device='cuda') for _ in range(4))

    def eager(batches):
        m.zero_grad(set_to_none=True)
        losses = []
        for X, Y in batches:
            with ac:
                loss = m(X, Y)[1]
            loss.backward()
            losses.append(loss.item())
        return losses, {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                        for n, p in m.named_parameters()}

    want_losses, want_grads = eager([(X1, Y1), (X2, Y2)])
    m.zero_grad(set_to_none=True)
    step = train_runner.GraphedStep(m, m.parameters(), ac, X1, Y1)
    got_losses = [step(X, Y).item() for X, Y in ((X1, Y1), (X2, Y2))]
    for a, b in zip(got_losses, want_losses):
        assert abs(a - b) < 1e-2 * abs(b), (got_losses, want_losses)
    for n, p in m.named_parameters():
        err = model_lib.rel_rms(p.grad, want_grads[n])
        assert err < 1e-2, (n, err)


NSA_GRAPH_GAP = pytest.mark.xfail(strict=True, reason=(
    "measured on the H200 at 13f0f7f (results/cuda-tests/13f0f7f/): with every block selected, eager and graphed "
    "NSA training still part by 0.0102 in train loss (3.0661 vs 3.0559 at the first logged step; 2.5729 vs 2.5713 "
    "at the last), over the 1e-2 bound. The likely cause, measured at e4f0c43 (results/cuda-tests/e4f0c43/"
    "diag_nsa_det.log): NSA's fla backward is not bitwise deterministic (two backward passes on identical inputs "
    "differ, by up to 7.6e-6 in a v_proj gradient), while vanilla's and DeltaNet's are, so even two eager runs "
    "need not agree after 30 steps; comparing graphed against eager's own run-to-run spread has not yet run"))


@pytest.mark.cuda
@pytest.mark.parametrize('model_type,extra', [('vanilla', {}), ('delta', {}), ('delta_product', {}),
                                              pytest.param('nsa', {'nsa_block_counts': 8}, marks=NSA_GRAPH_GAP)],
                         ids=['vanilla', 'delta', 'delta_product', 'nsa_all_blocks'])
def test_cuda_graph_training_matches_eager(prepared, tmp_path, model_type, extra):
    """The captured forward+backward (train_runner.GraphedStep), replayed with 2 accumulated micro-steps,
    trains like the eager loop: the same losses after 30 iterations (bf16 autocast: same kernels, so the
    difference is tiny; 1e-2 would flag a replay that read stale inputs or didn't accumulate).
    NSA selects 8 blocks of 32 here, every block of the 256-token context, so its top-k has no choice to
    make: with the default 4, its eager and graphed trajectories part (measured on the H200: train loss
    0.0018 apart at step 10, 0.032 at 20). Selecting every block did not close the gap (NSA_GRAPH_GAP), so
    the near-tied block choice is not its only cause: NSA's backward is not bitwise deterministic, which the
    vanilla and delta cases' tight bound assumes. The case stays a strict expected failure, since a loose
    tolerance would hide a real fault. The one-step test above checks NSA's capture."""
    run = {**GPU_RUN, **extra, 'model_type': model_type}
    eager = train_runner.train(None, {**run, 'out_dir': str(tmp_path / 'eager'), 'cuda_graphs': False})
    graph = train_runner.train(None, {**run, 'out_dir': str(tmp_path / 'graph'), 'cuda_graphs': True})
    assert graph['cuda_graphs'] is True and eager['cuda_graphs'] is False  # captured, no silent fallback
    a, b = read_metrics(tmp_path / 'eager'), read_metrics(tmp_path / 'graph')
    la = [r['loss'] for r in a if r['kind'] == 'train']
    lb = [r['loss'] for r in b if r['kind'] == 'train']
    assert len(la) == len(lb) == 3 and la[-1] < la[0]  # it learns
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-2, (la, lb)
    assert abs(eager['final_val_loss'] - graph['final_val_loss']) < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs')
def test_sweep_on_two_gpus_equals_one(prepared, tmp_path):
    """--gpus=2 runs the same runs, with the same results, as one GPU after another."""
    opts = dict(models='vanilla', lrs='1e-3,3e-3', seeds=1, bench=False, max_iters=20, eval_interval=20, eval_iters=2,
                n_layer=2, device='cuda', compile=False, cuda_graphs=False)
    one = train_runner.sweep({**opts, 'results_dir': str(tmp_path / 'one')})
    two = train_runner.sweep({**opts, 'results_dir': str(tmp_path / 'two'), 'gpus': 2})
    for a, b in zip(one['runs'], two['runs']):
        assert (a['model_type'], a['learning_rate']) == (b['model_type'], b['learning_rate'])
        assert abs(a['final_val_loss'] - b['final_val_loss']) < 1e-2


@pytest.mark.cuda
def test_a_model_that_cannot_be_captured_trains_eagerly(prepared, tmp_path, monkeypatch):
    """A forward that synchronises with the host can't be captured: train() says so, runs eager steps
    (record: cuda_graphs False) and the run still learns; torch.compile stays on."""
    orig = model_lib.GPT.forward

    def syncing(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training:
            out[1].item()  # a host sync: illegal while a CUDA graph is being captured
        return out
    monkeypatch.setattr(model_lib.GPT, 'forward', syncing)
    s = train_runner.train(None, {**GPU_RUN, 'model_type': 'vanilla', 'out_dir': str(tmp_path),
                                  'cuda_graphs': True})
    assert s['cuda_graphs'] is False and s['final_val_loss'] < 3.0
