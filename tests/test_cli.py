"""The command line and bad input: choices, types and ranges named in one-line errors, --help from the code's key
tables (and docs/configuration.md generated from them), Ctrl-C, what counts as the user's error, the learning-rate
schedule of shipped configs under overrides, run folders and git-ignored checkpoints."""
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import bench
import model as model_lib
import runtime
import sample
import tasks
import train_runner
from conftest import ROOT

TINY_RUN = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=8, dropout=0.0, device='cpu',
                eval_iters=1, eval_batch_size=8, log_interval=5, compile=False)


def _gen_docs():
    spec = importlib.util.spec_from_file_location('gen_docs', os.path.join(ROOT, 'tools', 'gen_docs.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- choices, types, ranges

@pytest.mark.parametrize('key', ['compile', 'cuda_graphs'])
def test_tristate_keys_take_only_true_false_auto(key):
    """--compile=no once passed the type check against the 'auto' default and turned compile on (bool('no'))."""
    for bad in ('no', 'off', 'maybe', 'False', 1, 0):
        with pytest.raises(ValueError, match=f"{key} must be one of True, False, auto; got {bad!r}"):
            train_runner.resolve_config(None, {key: bad, 'device': 'cpu'})
    for good in (True, False, 'auto'):
        assert train_runner.resolve_config(None, {key: good, 'device': 'cpu'})[key] is good or good == 'auto'
    assert train_runner.parse_cli([f'--{key}=false'])[1] == {key: False}
    with pytest.raises(ValueError, match='must be one of'):  # every caller of the compile/graph decision
        runtime.execution_modes(model_lib.GPT, 'cpu', **{key: 'no'})
    with pytest.raises(SystemExit, match=f"{key} must be one of True, False, auto; got 'no'"):  # bench's keys
        bench.main(['throughput', f'--{key}=no'])
    with pytest.raises(ValueError, match="compile must be one of"):  # checked before it looks for nanoGPT
        bench.vs_nanogpt(nanogpt_dir=os.path.join(ROOT, 'no-such-dir'), compile='no', tiny=True)


def test_bench_checks_bool_and_number_keys(tmp_path):
    small = ['--tiny=True', '--models=vanilla', f'--out={tmp_path}']
    for args, msg in ((['memory', '--warmup=off', *small], 'warmup must be a bool'),
                      (['memory', '--repeats=abc', *small], 'repeats must be an int'),
                      (['all', '--tiny=no'], 'tiny must be one of None, True, False')):
        with pytest.raises(SystemExit, match=msg):
            bench.main(args)


def test_sample_checks_types_and_ranges():
    """--num_samples=abc and --max_new_tokens=-5 once ended in a raw TypeError / RuntimeError while decoding."""
    for arg, msg in (('--num_samples=abc', "num_samples must be an int"),
                     ('--max_new_tokens=-5', 'max_new_tokens must be >= 1'),
                     ('--num_samples=0', 'num_samples must be >= 1'), ('--temperature=-1', 'temperature must be >= 0'),
                     ('--compile=no', 'compile must be one of True, False, auto'), ('--ckpt=first', 'ckpt must be one of best, last'),
                     ('--top_k=0', 'top_k must be >= 1'), ('--device=gpu', 'device must be'),
                     ('--start=', 'start is empty')):
        with pytest.raises(ValueError, match=msg):
            sample.parse_args([arg])
    cfg = sample.parse_args(['--top_k=None', '--temperature=1', '--start=2'])
    assert cfg['top_k'] is None and cfg['temperature'] == 1.0 and cfg['start'] == '2'


def test_training_ranges_are_checked():
    for bad, msg in (({'log_interval': 0}, 'log_interval must be >= 1'), ({'eval_interval': 0}, 'eval_interval'),
                     ({'batch_size': 0}, 'batch_size must be >= 1'), ({'learning_rate': -1e-3}, 'learning_rate'),
                     ({'max_iters': -1}, 'max_iters must be >= 0')):
        with pytest.raises(ValueError, match=msg):
            train_runner.resolve_config(None, bad)


def test_sweep_list_options_name_the_option(tmp_path):
    """--lrs=abc said "could not convert string to float: 'abc'" and --seeds=two "invalid literal for int()"."""
    opts = dict(models='vanilla', bench=False, results_dir=str(tmp_path), max_iters=2, device='cpu')
    for bad, msg in (({'lrs': 'abc'}, r"--lrs must be comma-separated learning rates.*got 'abc'"),
                     ({'lrs': '1e-3,x'}, '--lrs must be'),
                     ({'seeds': 'two'}, r"--seeds must be >= 1 \(an integer\); got 'two'"),
                     ({'seeds': 1.5}, '--seeds must be'), ({'gpus': 'all'}, '--gpus must be'),
                     ({'bench': 'no'}, 'bench must be a bool')):
        with pytest.raises(train_runner.ConfigError, match=msg):
            train_runner.sweep({**opts, **bad})
    assert not os.listdir(tmp_path)


def test_fla_backend_on_cpu_fails_when_the_config_resolves():
    for mt in ('delta', 'delta_product', 'nsa'):
        with pytest.raises(train_runner.ConfigError, match=r"backend='fla' needs CUDA .* use backend='auto'"):
            train_runner.resolve_config(None, {'model_type': mt, 'backend': 'fla', 'device': 'cpu'})
        assert train_runner.resolve_config(None, {'model_type': mt, 'backend': 'torch', 'device': 'cpu'})


def test_model_problems_fail_when_the_config_resolves():
    with pytest.raises(train_runner.ConfigError, match='parameter matching failed'):
        train_runner.resolve_config(None, {'model_type': 'delta', 'n_embd': 96})
    with pytest.raises(train_runner.ConfigError, match='no complete block'):
        train_runner.resolve_config(None, {'model_type': 'nsa', 'block_size': 16, 'backend': 'torch'})
    with pytest.raises(train_runner.ConfigError, match='valid choices: vanilla'):
        train_runner.resolve_config(None, {'model_type': 'rwkv'})


# ----------------------------------------------------------------------------- the learning-rate schedule

SHIPPED_DECAY = {'train_shakespeare_char.py': 3000, 'train_shakespeare_char_delta.py': 3000,
                 'train_shakespeare_char_delta_product.py': 3000, 'train_shakespeare_char_nsa.py': 3000,
                 'train_shakespeare_char_nanogpt.py': 5000}  # what each config hard-coded, = its max_iters


@pytest.mark.parametrize('config', sorted(SHIPPED_DECAY))
def test_lr_decay_follows_max_iters_overrides(config):
    """Every config hard-coded lr_decay_iters=3000, so train(config, {'max_iters': 500}) trained at an almost
    constant learning rate. At their own max_iters the schedule is the one they had."""
    lm_configs = [f for f in os.listdir(os.path.join(ROOT, 'config')) if f.startswith('train_shakespeare_char')]
    assert sorted(SHIPPED_DECAY) == sorted(lm_configs)
    for task_config in ('mqar.py', 'state_tracking.py'):  # the examples tasks' length comes from epochs
        assert train_runner.resolve_config(os.path.join(ROOT, 'config', task_config))['lr_decay_iters'] == 0
    path = os.path.join(ROOT, 'config', config)
    cfg = train_runner.resolve_config(path)
    old = {**cfg, 'lr_decay_iters': SHIPPED_DECAY[config]}
    assert cfg['max_iters'] == SHIPPED_DECAY[config]
    assert [train_runner.get_lr(it, cfg) for it in range(0, cfg['max_iters'] + 1, 50)] == \
        [train_runner.get_lr(it, old) for it in range(0, cfg['max_iters'] + 1, 50)]
    short = train_runner.resolve_config(path, {'max_iters': 500})
    min_lr = short['min_lr'] or short['learning_rate'] / 10
    assert train_runner.get_lr(500, short) == pytest.approx(min_lr)
    assert train_runner.get_lr(300, short) < 0.6 * short['learning_rate']
    explicit = train_runner.resolve_config(path, {'max_iters': 500, 'lr_decay_iters': 1000})
    assert train_runner.get_lr(500, explicit) > 0.5 * short['learning_rate']  # an explicit value is kept


def test_committed_full_runs_from_before_the_test_split_are_not_the_new_runs(capsys):
    """The committed results/full runs were evaluated on the whole last 10% (no test split): the sweep reads
    their missing keys as defaults, yet must not count them as runs of the bake-off, which plans 3 seeds per
    model at its tuned (lr, dropout) in folders of their own."""
    out = train_runner.sweep({'preset': 'full', 'bench': False, 'device': 'cpu', 'plan': True})
    assert out['results_dir'] == os.path.join(ROOT, 'results', 'full')
    assert len(out['plan']) == 4 * 3 and {r['stage'] for r in out['plan']} == {'seeds'}
    tuned = train_runner.bakeoff_config('full')[0]  # config/bakeoff.py's choices
    assert all(os.path.basename(r['out_dir']) == f"{r['name']}-lr{tuned[r['name']][0]:g}-d{tuned[r['name']][1]:g}"
               f"-s{r['seed']}" for r in out['plan'])
    # what counts as done is a record of the new protocol in the planned folder (the tuning grid's seed at that
    # cell), never an old record: those lie in folders named without the dropout
    new = [r for r in out['plan'] if os.path.exists(os.path.join(r['out_dir'], 'summary.json'))]
    assert all(json.load(open(os.path.join(r['out_dir'], 'summary.json'))).get('test_loss') is not None for r in new)
    assert f'plan: 12 runs, {12 - len(new)} to train' in capsys.readouterr().out


# ----------------------------------------------------------------------------- faults: Ctrl-C, errors, out_dir

def _interrupt_after(monkeypatch, n):
    orig = model_lib.GPT.forward
    calls = {'n': 0}

    def forward(self, *a, **k):
        if self.training:
            calls['n'] += 1
            if calls['n'] > n:
                raise KeyboardInterrupt
        return orig(self, *a, **k)
    monkeypatch.setattr(model_lib.GPT, 'forward', forward)


def test_ctrl_c_says_where_the_run_stands_and_exits_130(prepared, tmp_path, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 23)  # iterations 0..22 done: the checkpoint of iteration 20 exists
    args = ['config/train_shakespeare_char.py', *(f'--{k}={v}' for k, v in TINY_RUN.items()),
            f'--out_dir={tmp_path}', '--max_iters=50', '--eval_interval=10']
    with pytest.raises(SystemExit) as e:
        train_runner.main(args)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert f"interrupted at iter 23 ({tmp_path}); the last checkpoint is iter 20; resume with --init_from=resume" in err
    monkeypatch.undo()
    s = train_runner.train('config/train_shakespeare_char.py', {**TINY_RUN, 'out_dir': str(tmp_path),
                                                                 'max_iters': 30, 'eval_interval': 10,
                                                                 'init_from': 'resume'})
    assert s['iters'] == 30


def test_ctrl_c_in_a_sweep_says_rerun_it(prepared, tmp_path, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        train_runner.main(['--models=vanilla', '--lrs=1e-3', '--seeds=1', '--bench=False', f'--results_dir={tmp_path}',
                           '--max_iters=10', '--eval_interval=5', '--eval_iters=1', '--device=cpu', '--n_layer=1',
                           '--batch_size=4', '--eval_batch_size=4'])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at iter 3" in err and "no checkpoint yet" in err
    monkeypatch.undo()
    _interrupt_after(monkeypatch, 7)  # the rerun starts again (no checkpoint), and is interrupted after iter 5's
    with pytest.raises(SystemExit):
        train_runner.main(['--models=vanilla', '--lrs=1e-3', '--seeds=1', '--bench=False', f'--results_dir={tmp_path}',
                           '--max_iters=10', '--eval_interval=5', '--eval_iters=1', '--device=cpu', '--n_layer=1',
                           '--batch_size=4', '--eval_batch_size=4'])
    assert "the last checkpoint is iter 5; rerun the sweep" in capsys.readouterr().err


def test_sigint_in_a_real_process(prepared, tmp_path):
    """The same through a real SIGINT: exit status 130, the message, no traceback."""
    cmd = [sys.executable, 'train_runner.py', 'config/train_shakespeare_char.py',
           *(f'--{k}={v}' for k, v in TINY_RUN.items()), f'--out_dir={tmp_path}', '--max_iters=100000',
           '--eval_interval=10']
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:
            if line.startswith('step 20:'):  # printed just before iteration 20's checkpoint; iteration 10's exists
                break
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert re.search(r"interrupted at iter \d+ \(.*\); the last checkpoint is iter [1-9]\d*0; resume with "
                     r"--init_from=resume", err), err
    assert 'Traceback' not in err


def test_user_errors_get_one_line_and_bugs_their_traceback(monkeypatch, tmp_path):
    """What is the user's making: a bad config (ConfigError), a missing file, a dataset error, a diverged run,
    out of memory. Anything else -- a plain ValueError included -- is a bug and keeps its traceback."""
    class DatasetError(RuntimeError):  # data/<dataset>/prepare.py's class, by name
        pass

    def raising(e):
        def train(*a, **k):
            raise e
        return train
    users = [train_runner.ConfigError('bad key'), FileNotFoundError('no such file x'), DatasetError('rerun prepare.py'),
             train_runner.NonFiniteLoss('loss is nan'),
             torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
             RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")]
    for e in users:
        monkeypatch.setattr(train_runner, 'train', raising(e))
        with pytest.raises(SystemExit) as ex:
            train_runner.main(['config/train_shakespeare_char.py'])
        assert isinstance(ex.value.code, str) and ex.value.code.startswith('error: ') and '\n' not in ex.value.code
        if 'memory' in str(e):
            assert 'out of memory' in ex.value.code and 'reduce batch_size' in ex.value.code
    monkeypatch.undo()
    bad = tmp_path / 'bad_config.py'
    bad.write_text('n_layer = 4\nbatch_size = sixty_four\n')
    for argv, msg in (([str(bad)], f"config file {bad}, line 2: NameError"),
                      (['--models=rwkv', '--bench=False'], "unknown model 'rwkv' in 'rwkv'; valid models: vanilla")):
        with pytest.raises(SystemExit, match=msg):
            train_runner.main(argv)
    for bug in (ValueError('math domain error'), KeyError('iter'), TypeError('unsupported operand'),
                RuntimeError('shape mismatch')):
        monkeypatch.setattr(train_runner, 'train', raising(bug))
        with pytest.raises(type(bug)):
            train_runner.main(['config/train_shakespeare_char.py'])


def test_a_failed_config_leaves_no_out_dir(prepared, tmp_path):
    missing = tmp_path / 'resume-nothing'
    with pytest.raises(FileNotFoundError, match="init_from='resume'"):
        train_runner.train(None, {**TINY_RUN, 'out_dir': str(missing), 'init_from': 'resume'})
    assert not missing.exists()
    bad = tmp_path / 'bad-nsa'
    with pytest.raises(ValueError, match='no complete block'):
        train_runner.train(None, {**TINY_RUN, 'model_type': 'nsa', 'out_dir': str(bad), 'backend': 'torch',
                                  'nsa_block_size': 128, 'max_iters': 0})
    assert not bad.exists()
    with pytest.raises(SystemExit):
        train_runner.main([f'--out_dir={tmp_path / "cli"}', '--model_type=delta', '--n_embd=96', '--device=cpu',
                           '--max_iters=0', '--eval_iters=1', '--batch_size=2', '--eval_batch_size=2'])
    assert not (tmp_path / 'cli').exists()


# ----------------------------------------------------------------------------- --help and the generated docs

def _help(main, argv, capsys):
    rc = main(argv)
    assert rc in (None, 0)
    return capsys.readouterr().out


@pytest.mark.parametrize('model_type', list(model_lib.MODEL_TYPES))
def test_train_runner_help_lists_every_key_with_its_meaning(model_type, capsys):
    out = _help(train_runner.main, [f'--model_type={model_type}', '--help'], capsys)
    mhelp = model_lib.config_help(model_lib.get_model_module(model_type).GPTConfig)
    mhelp = {k: h for k, h in mhelp.items() if k not in train_runner.HELP}  # model_type: a training key
    for k, meaning in [*train_runner.HELP.items(), *mhelp.items(), *train_runner.SWEEP_HELP.items()]:
        assert meaning and f'--{k}=' in out and meaning in out, k
    assert f"model keys of model_type {model_type!r}" in out
    assert _help(train_runner.main, ['-h'], capsys).startswith(train_runner.__doc__.strip()[:40])
    cfg_out = _help(train_runner.main, ['config/train_shakespeare_char_nsa.py', '--n_layer=3', '--help'], capsys)
    assert '--n_layer=3 ' in cfg_out and '--nsa_block_size=32 ' in cfg_out  # values: the config file's and options'


@pytest.mark.parametrize('task', [t for t in tasks.TABLE if tasks.TABLE[t]])
def test_train_runner_help_lists_every_task_key_with_its_meaning(task, capsys):
    out = _help(train_runner.main, [f'--task={task}', '--help'], capsys)
    assert f"task keys of task {task!r}" in out
    for k, (_, meaning) in tasks.TABLE[task].items():
        assert meaning and f'--{k}=' in out and meaning in out, k
    others = {k for t, keys in tasks.TABLE.items() if t != task for k in keys} - set(tasks.TABLE[task])
    assert not [k for k in others if f'--{k}=' in out]  # only the chosen task's keys


def test_every_model_field_has_a_meaning():
    for mt in model_lib.MODEL_TYPES:
        cls = model_lib.get_model_module(mt).GPTConfig
        missing = [k for k, h in model_lib.config_help(cls).items() if not h]
        assert not missing, f"{cls.__module__}.GPTConfig fields without a meaning: {missing} (use model.setting)"


def test_sample_help_lists_every_key(capsys):
    text = sample.usage()
    for k, d in sample.DEFAULTS.items():
        assert f'--{k}={runtime.show_value(d)}' in text and sample.HELP[k] in text, k


@pytest.mark.parametrize('command', list(bench.COMMANDS))
def test_bench_help_per_sub_command(command, capsys):
    out = _help(bench.main, [command, '--help'], capsys)
    for k, p in inspect.signature(bench.COMMANDS[command]).parameters.items():
        meaning = bench.key_help(command, k)
        assert meaning, f"bench.HELP has no meaning for {command}'s key {k!r}"
        assert f'--{k}={runtime.show_value(p.default)}' in out and meaning in out, k


def test_help_from_the_command_line():
    for cmd in (['train_runner.py', '--help'], ['sample.py', '--help'], ['bench.py', 'memory', '--help']):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and '--device=' in r.stdout, (cmd, r.stderr[-1000:])


def test_configuration_docs_are_generated_and_complete():
    gen = _gen_docs()
    with open(gen.PATH) as f:
        text = f.read()
    assert text == gen.render(), "docs/configuration.md is out of date: run python tools/gen_docs.py"
    keys = set(train_runner.DEFAULTS) | set(train_runner.SWEEP_KEYS) | set(sample.DEFAULTS)
    for mt in model_lib.MODEL_TYPES:
        keys |= set(model_lib.config_help(model_lib.get_model_module(mt).GPTConfig))
    keys |= set(tasks.HELP)
    for fn in bench.COMMANDS.values():
        keys |= set(inspect.signature(fn).parameters)
    assert not [k for k in keys if f'| `{k}` |' not in text]
    for command in bench.COMMANDS:
        assert f'### {command}\n' in text


def test_bench_doc_names_every_sub_command_and_the_real_layout():
    listed = re.findall(r'^    (\w+)\s{2,}', bench.__doc__, flags=re.M)
    assert sorted(listed) == sorted(bench.COMMANDS)
    assert 'results/runs/' not in bench.__doc__ and 'results/<preset>/runs/' in bench.__doc__


# ----------------------------------------------------------------------------- git

@pytest.mark.skipif(shutil.which('git') is None or not os.path.exists(os.path.join(ROOT, '.git')),
                    reason='needs a git checkout')
def test_checkpoints_under_results_are_git_ignored():
    run = 'results/cpu/runs/vanilla-lr0.001-s1337'

    def ignored(path):
        return subprocess.run(['git', 'check-ignore', '-q', '--no-index', path], cwd=ROOT).returncode == 0
    for f in ('ckpt_last.pt', 'ckpt_best.pt', 'ckpt_last.pt.tmp', 'summary.json.tmp'):
        assert ignored(f'{run}/{f}'), f
        assert ignored(f'results/full/runs/x/{f}'), f
    for f in ('summary.json', 'config.json', 'metrics.jsonl'):  # the records are results, kept
        assert not ignored(f'{run}/{f}'), f
    assert not ignored('results/cpu/REPORT.md')
