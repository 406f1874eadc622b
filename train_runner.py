"""
Train one model, or reproduce the whole comparison.

    python train_runner.py                                   # the full reproduction: sweep + benchmarks + report
    python train_runner.py --max_iters=2 --wandb_log=False   # smoke test of that whole pipeline
    python train_runner.py config/train_shakespeare_char_delta.py --learning_rate=3e-3   # one run
    torchrun --standalone --nproc_per_node=2 train_runner.py config/train_shakespeare_char.py   # one run, DDP

From Python / a notebook:

    from train_runner import train
    summary = train('config/train_shakespeare_char_nsa.py', {'max_iters': 500})

Configuration is nanoGPT's: plain Python files of assignments plus --key=value overrides (or a dict).
Keys are DEFAULTS below plus the fields of the chosen model_type's GPTConfig; anything else is an error
that names the valid keys. Each run writes, into out_dir: config.json (resolved config, git commit,
library versions, device, parameter count), metrics.jsonl (one JSON object per log/eval line),
summary.json (what train() returns), ckpt_best.pt (best val loss so far) and ckpt_last.pt (for resume).
"""

import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

import model as model_lib
from runtime import (ConfigError, GraphedStep, Progress, as_list, atomic_torch_save, atomic_write_json,
                     check_block_size, execution_modes, fmt_time, load_dataset, load_json, parse_value, peak_flops,
                     pick_device, run_metadata)

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# training keys (model keys come from the model_type's GPTConfig). Defaults: nanoGPT's shakespeare_char.
DEFAULTS = dict(
    # I/O
    out_dir='out-shakespeare-char',
    eval_interval=250,
    log_interval=10,
    eval_iters=10,           # fixed evaluation set: eval_iters batches of eval_batch_size windows per split
    eval_batch_size=0,       # 0 -> 256 on CUDA (few large batches under no_grad), batch_size on CPU
    eval_only=False,
    init_from='scratch',     # 'scratch' or 'resume' (from out_dir/ckpt_last.pt)
    preset='single',         # a label recorded in every result file (the sweep sets 'full' / 'cpu')
    # logging: local files always; wandb optional and off by default
    wandb_log=False,
    wandb_project='attention-bakeoff',
    wandb_run_name='',
    # data
    dataset='shakespeare_char',
    gradient_accumulation_steps=1,
    batch_size=64,
    # model
    model_type='vanilla',
    # optimizer: AdamW
    learning_rate=1e-3,
    max_iters=5000,
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,           # 0 disables
    # learning-rate schedule: linear warmup, cosine decay to min_lr
    decay_lr=True,
    warmup_iters=100,
    lr_decay_iters=0,        # 0 -> max_iters
    min_lr=0.0,              # 0 -> learning_rate / 10
    # system
    device='auto',           # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',            # 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16', 'float16', 'float32'
    compile='auto',          # 'auto' (on for CUDA), True, False
    cuda_graphs='auto',      # capture fwd+bwd in a CUDA graph: 'auto' (on for single-process CUDA), True, False
    seed=1337,
    peak_flops=0.0,          # device bf16 peak for MFU; 0 -> known/measured for the device
)
# keys that may differ between a checkpoint and the run resuming it (length, logging, where it runs)
RESUME_MAY_CHANGE = {'max_iters', 'init_from', 'eval_only', 'log_interval', 'eval_interval', 'wandb_log',
                     'wandb_project', 'wandb_run_name', 'device', 'compile', 'cuda_graphs', 'preset', 'out_dir'}
# the model defaults that nanoGPT's shakespeare_char run uses and differ from GPTConfig's
TRAIN_MODEL_DEFAULTS = dict(dropout=0.2)


# keys whose value may be either of two types (their default's, or these)
EXTRA_TYPES = {'compile': (bool,), 'cuda_graphs': (bool,)}


def _check_type(key, value, default):
    """value, coerced to the default's type where that is lossless; a ConfigError otherwise."""
    if default is None or isinstance(value, type(default)) and not (isinstance(value, bool) and
                                                                     not isinstance(default, bool)):
        return value
    if isinstance(value, EXTRA_TYPES.get(key, ())):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{key} must be a {type(default).__name__} (default {default!r}), got {value!r}")


def parse_cli(argv):
    """argv -> (config_file or None, overrides dict) from `[config.py] [--key=value ...]`."""
    config_file, overrides = None, {}
    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            k, v = arg[2:].split('=', 1)
            overrides[k] = parse_value(v)
        elif config_file is None:
            config_file = arg
        else:
            raise ConfigError(f"only one config file may be given, got {config_file!r} and {arg!r}")
    return config_file, overrides


def read_config_file(path):
    """A config file is plain Python; its top-level assignments are the keys."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found; configs shipped: "
                          f"{', '.join(sorted(os.listdir(os.path.join(HERE, 'config'))))}")
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), {}, scope)
    return {k: v for k, v in scope.items() if not k.startswith('_') and not callable(v)
            and not isinstance(v, type(os))}


def model_keys(model_type):
    return {f.name: f.default for f in fields(model_lib.get_model_module(model_type).GPTConfig)}


def resolve_config(config_file=None, overrides=None):
    """DEFAULTS <- model defaults <- config file <- overrides, with every key checked."""
    file_cfg = read_config_file(config_file) if config_file else {}
    overrides = dict(overrides or {})
    model_type = overrides.get('model_type', file_cfg.get('model_type', DEFAULTS['model_type']))
    mkeys = model_keys(model_type)  # raises for an unknown model_type, naming the valid ones
    cfg = {**DEFAULTS, **mkeys, **TRAIN_MODEL_DEFAULTS}
    for source, d in (('config file ' + str(config_file), file_cfg), ('overrides', overrides)):
        unknown = sorted(set(d) - set(cfg))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {source} for model_type {model_type!r}; "
                              f"valid keys: {', '.join(sorted(cfg))}")
        cfg.update({k: _check_type(k, v, cfg[k]) for k, v in d.items()})
    cfg['model_type'] = model_type
    if cfg['init_from'] not in ('scratch', 'resume'):
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    if cfg['dtype'] not in ('auto', 'bfloat16', 'float32'):  # float16 would need loss scaling: not supported
        raise ConfigError(f"dtype must be one of auto, bfloat16, float32; got {cfg['dtype']!r}")
    dev = cfg['device']
    if not (dev in ('auto', 'cpu', 'cuda') or (dev.startswith('cuda:') and dev[5:].isdigit())):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {dev!r}")
    return cfg


# ----------------------------------------------------------------------------------------------
# environment facts recorded with every result


# ----------------------------------------------------------------------------------------------
# data


def get_batch(data, ix, block_size):
    """Windows starting at ix (B,) -> x, y (B, T). Indexing happens on data's device: no host copies."""
    offs = torch.arange(block_size + 1, device=data.device)
    win = data[ix.to(data.device, non_blocking=True)[:, None] + offs]  # (B, T+1)
    return win[:, :-1], win[:, 1:]


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    lr, min_lr = cfg['learning_rate'], cfg['min_lr'] or cfg['learning_rate'] / 10
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if not cfg['decay_lr']:
        return lr
    if it < cfg['warmup_iters']:
        return lr * (it + 1) / (cfg['warmup_iters'] + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def run_eta(s_per_iter, iter_num, max_iters, eval_interval, eval_s, n_evals):
    """Seconds left of a run after iter_num iterations: the rest at s_per_iter, and the evaluations still to
    come (at every multiple of eval_interval from iter_num on, and at max_iters) at the mean time of the
    n_evals so far (eval_s in all)."""
    evals_left = max_iters // eval_interval - (iter_num - 1) // eval_interval + (max_iters % eval_interval != 0)
    return s_per_iter * (max_iters - iter_num) + evals_left * (eval_s / n_evals if n_evals else 0.0)


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# one run

def train(config_file=None, overrides=None):
    """Train one model. Returns the run's summary dict (also written to out_dir/summary.json)."""
    cfg = resolve_config(config_file, overrides)
    t_start = time.time()

    # --- distributed (torchrun) or single process
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import torch.distributed as dist
        world_size = int(os.environ['WORLD_SIZE'])
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        use_cuda = pick_device(cfg['device']).startswith('cuda')
        device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
        if cfg['gradient_accumulation_steps'] % world_size:
            raise ConfigError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be "
                              f"divisible by the number of processes ({world_size}): the global batch stays fixed")
        gas = cfg['gradient_accumulation_steps'] // world_size
    else:
        world_size, rank, device = 1, 0, pick_device(cfg['device'])
        gas = cfg['gradient_accumulation_steps']
        if device.startswith('cuda:') and torch.cuda.is_available():
            # device='cuda:N': the CUDA RNG states saved for resume and the graph capture's streams are
            # the current device's, so make it N
            torch.cuda.set_device(device)
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg['device']!r} but CUDA is not available; use device='cpu' or 'auto'")
    dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else (
        'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32')
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
    autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    use_compile, use_graphs = execution_modes(model_lib.get_model_module(cfg['model_type']).GPT, device_type,
                                              cfg['compile'], cfg['cuda_graphs'], ddp)
    eval_bs = cfg['eval_batch_size'] or (256 if device_type == 'cuda' else cfg['batch_size'])
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = cfg['out_dir']
    ckpt_last, ckpt_best = os.path.join(out_dir, 'ckpt_last.pt'), os.path.join(out_dir, 'ckpt_best.pt')
    metrics_path, summary_path = os.path.join(out_dir, 'metrics.jsonl'), os.path.join(out_dir, 'summary.json')

    # --- data and model
    data, meta = load_dataset(cfg['dataset'], device)
    if master:
        os.makedirs(out_dir, exist_ok=True)
    mkeys = model_keys(cfg['model_type'])
    mcfg = {k: cfg[k] for k in mkeys}
    # no meta.pkl: GPT-2 BPE, its 50257 tokens padded to 50304, a multiple of 64, as nanoGPT pads
    mcfg['vocab_size'] = meta['vocab_size'] if meta else 50304
    block_size = mcfg['block_size']
    check_block_size(data, block_size, cfg['dataset'])
    ckpt = None
    if cfg['init_from'] == 'resume':
        if not os.path.exists(ckpt_last):
            raise FileNotFoundError(f"init_from='resume' but {ckpt_last} does not exist")
        ckpt = torch.load(ckpt_last, map_location=device, weights_only=False)
        changed = sorted(k for k, v in cfg.items() if k not in RESUME_MAY_CHANGE and ckpt['config'].get(k, v) != v)
        if changed:
            raise ConfigError(f"init_from='resume' with a different config than {ckpt_last} was trained with: "
                              + ', '.join(f"{k}={cfg[k]!r} (checkpoint: {ckpt['config'][k]!r})" for k in changed)
                              + f"; only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume")
        if len(ckpt['rng']) != world_size:
            raise ConfigError(f"{ckpt_last} was written by {len(ckpt['rng'])} process(es), this run has {world_size}: "
                              f"resume with the same number, so every rank continues its own data stream")
        done = load_json(summary_path)
        if (not cfg['eval_only'] and done and done.get('status') == 'done' and done.get('iters') == ckpt['iter_num']
                and ckpt['iter_num'] >= cfg['max_iters']):  # finished: there is nothing to resume
            if master:
                print(f"{cfg['model_type']} in {out_dir} already finished at iteration {ckpt['iter_num']} (best val "
                      f"{done['best_val_loss']:.4f}); nothing to train, its records are kept. To train longer, "
                      f"resume with a larger max_iters")
            if ddp:
                dist.destroy_process_group()
            return done
        mcfg = ckpt['model_config']  # the architecture as built (d_ff solved)
    torch.manual_seed(cfg['seed'])  # same init on every rank
    model = model_lib.get_model_module(cfg['model_type']).GPT(
        model_lib.get_model_module(cfg['model_type']).GPTConfig(**mcfg))
    model.to(device)
    n_params = model.get_num_params(non_embedding=False)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), device_type)
    # separate generators: data sampling (per-rank offset) and the fixed evaluation windows
    data_gen = torch.Generator().manual_seed(cfg['seed'] + 1000 * rank)
    torch.manual_seed(cfg['seed'] + rank)  # dropout differs per rank
    iter_num, best_val, best_iter = 0, float('inf'), -1
    # what the earlier segments of a resumed run measured, up to its checkpoint: times (summed over segments),
    # timing windows (one list per segment), last eval losses, how the last steps ran
    prev = dict(wall_s=0.0, train_s=0.0, eval_s=0.0, n_evals=0, window_times=[], segments=0,
                losses={'train': float('nan'), 'val': float('nan')}, ran=None)
    if ckpt is not None:
        prev.update(ckpt.get('progress', {}))
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, best_val, best_iter = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['best_iter']
        rng = ckpt['rng'][rank]
        # map_location moved every tensor to `device`; generator states are CPU ByteTensors
        data_gen.set_state(rng['data'].cpu())
        torch.set_rng_state(rng['torch'].cpu())
        if device_type == 'cuda' and rng['cuda'] is not None:
            torch.cuda.set_rng_state(rng['cuda'].cpu())
        if master and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            with open(metrics_path) as f:  # (a line cut short by a kill has no newline: it goes too)
                keep = [ln for ln in f if ln.endswith('\n') and json.loads(ln)['iter'] <= iter_num]
            with open(metrics_path, 'w') as f:
                f.writelines(keep)
        if master and not cfg['eval_only'] and os.path.exists(summary_path):
            os.remove(summary_path)  # an earlier, shorter segment's: this run writes its own when it finishes
        print(f"resuming {cfg['model_type']} from iteration {iter_num} (best val {best_val:.4f} at {best_iter})")
        del ckpt
    elif master:  # from scratch: nothing an earlier run left here may be mistaken for this run's
        for f in (metrics_path, ckpt_last, ckpt_best, summary_path):
            if os.path.exists(f):
                os.remove(f)

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)

    peak = (cfg['peak_flops'] or peak_flops(device)) if device_type == 'cuda' else None
    tokens_per_iter = gas * world_size * cfg['batch_size'] * block_size
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
    g = torch.Generator().manual_seed(12345)  # same evaluation windows for every run, model and seed
    # a window starts at 0 .. len - block_size - 1 (it takes block_size + 1 tokens): randint's high is exclusive
    eval_ix = {s: [torch.randint(len(d) - block_size, (eval_bs,), generator=g)
                   for _ in range(cfg['eval_iters'])] for s, d in data.items()}

    @torch.no_grad()
    def estimate_loss():
        # the raw (uncompiled) module: eval shapes differ from training's, and must not trigger recompiles
        raw_model.eval()
        out = {}
        progress = Progress(sum(map(len, eval_ix.values())), f"eval at iter {iter_num}", bar=True)  # minutes on CPU
        for split, ixs in eval_ix.items():
            losses = torch.zeros(len(ixs))
            for i, ix in enumerate(ixs):
                X, Y = get_batch(data[split], ix, block_size)
                with autocast:
                    losses[i] = raw_model(X, Y)[1].item()
                progress.update()
            out[split] = losses.mean().item()
        progress.close()
        raw_model.train()
        return out

    # --- records: config.json (resolved config + environment), wandb optional
    if master:
        # 'config' is what was asked for (the sweep compares it to decide what's done); 'model_config' is
        # the architecture as built (d_ff solved, vocab from the dataset, or a resumed checkpoint's)
        record = {'config': cfg, 'model_config': asdict(raw_model.config),
                  'n_params': n_params, 'n_params_non_embedding': raw_model.get_num_params(True),
                  'preset': cfg['preset'], 'world_size': world_size, 'dtype': dtype, 'compile': use_compile,
                  'cuda_graphs': use_graphs,
                  'eval_windows_per_split': cfg['eval_iters'] * eval_bs,
                  **run_metadata(device)}
        atomic_write_json(record, os.path.join(out_dir, 'config.json'))
        print(f"{cfg['model_type']}: {n_params / 1e6:.3f}M parameters, device {record['device']}, dtype {dtype}, "
              f"compile {use_compile}, CUDA graphs {use_graphs}, {tokens_per_iter:,} tokens/iter, out_dir {out_dir}")
    wandb_run = None
    if cfg['wandb_log'] and master:
        import wandb  # optional dependency, imported only when asked for
        wandb_run = wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'] or None,
                               config=record['config'], resume='allow')

    def log(row):
        if not master:
            return
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in row.items() if k not in ('kind',)}, step=row['iter'])

    def so_far():
        """The run's times and timing windows up to now, over all its segments (a resumed run's summary sums
        them); what a checkpoint carries for the segment that resumes from it."""
        now = time.time()
        return dict(wall_s=prev['wall_s'] + now - t_start, train_s=prev['train_s'] + now - t_train0,
                    eval_s=prev['eval_s'] + eval_s, n_evals=prev['n_evals'] + n_evals,
                    window_times=prev['window_times'] + [window_times], segments=prev['segments'] + 1,
                    losses=losses, ran=dict(compile=use_compile, cuda_graphs=graphed is not None)
                    if iter_num > start_iter or prev['ran'] is None else prev['ran'])

    def save(path, losses, rng_states):
        atomic_torch_save({
            'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
            'model_config': asdict(raw_model.config), 'config': cfg, 'iter_num': iter_num,
            'best_val_loss': best_val, 'best_iter': best_iter, 'val_loss': losses['val'],
            'rng': rng_states,  # one dict per rank: data sampling, dropout (CPU and CUDA generators)
            'progress': so_far(),
        }, path)

    # --- the loop
    losses = prev['losses']  # a run resumed at its last iteration evaluates nothing: the checkpoint's
    # the first window starts here: after the step-0 evaluation, or on resume (which skips that evaluation)
    window_times, window_t0, window_iters = [], time.time(), 0
    last_loss, eval_s, n_evals = float('nan'), 0.0, 0
    start_iter, t_train0 = iter_num, time.time()
    # a resumed run already evaluated (and logged) the iteration it resumes at
    skip_eval_at = iter_num if cfg['init_from'] == 'resume' and not cfg['eval_only'] else -1
    max_iters = cfg['max_iters']
    graphed = None  # the captured micro-step, made on the first one (after compilation)
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        if (iter_num % cfg['eval_interval'] == 0 or iter_num == max_iters) and iter_num != skip_eval_at:
            rng_states = _gather_rng_states(data_gen, device_type, ddp)  # a collective: every rank takes part
            if master:
                t_eval = time.time()
                losses = estimate_loss()
                eval_s, n_evals = eval_s + time.time() - t_eval, n_evals + 1
                if not all(math.isfinite(v) for v in losses.values()):
                    raise NonFiniteLoss(f"non-finite eval loss at iteration {iter_num}: {losses}; "
                                        f"the last good checkpoint is {ckpt_last}")
                better = losses['val'] < best_val
                if better:
                    best_val, best_iter = losses['val'], iter_num
                # the row before the checkpoint: a kill in between resumes from the previous checkpoint, which
                # drops the row and evaluates again; the other order would lose the row for good
                log({'kind': 'eval', 'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                     'lr': lr, 'tokens': iter_num * tokens_per_iter, 'flops': iter_num * flops_per_iter,
                     'time_s': round(prev['wall_s'] + time.time() - t_start, 3)})
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      f" (best {best_val:.4f} @ {best_iter})")
                if better:
                    save(ckpt_best, losses, rng_states)  # only ever replaced by a better one
                if iter_num > 0:
                    _fault_point('before_ckpt', iter_num)
                    save(ckpt_last, losses, rng_states)
                    _fault_point('after_ckpt', iter_num)
            window_t0, window_iters = time.time(), 0  # evaluation time is not training time
        if iter_num >= max_iters or cfg['eval_only']:
            break

        # one optimizer step = gas micro-steps
        for micro in range(gas):
            X, Y = get_batch(data['train'], torch.randint(len(data['train']) - block_size,
                                                         (cfg['batch_size'],), generator=data_gen), block_size)
            while use_graphs and graphed is None:  # capture; if the warm-up fails compiled, again without
                try:
                    graphed = GraphedStep(model, raw_model.parameters(), autocast, X, Y, gas)
                except model_lib.CaptureError as e:  # e.g. a kernel that synchronises with the host: fall back, loudly
                    print(f"cuda_graphs: capture failed for {cfg['model_type']} ({e}); running eagerly")
                    use_graphs = False
                    optimizer.zero_grad(set_to_none=True)
                except Exception as e:
                    if not use_compile:
                        raise
                    _say_compile_failed(cfg['model_type'], e)
                    use_compile, model = False, raw_model
            if graphed is not None:
                loss = graphed(X, Y)  # forward + backward, replayed
                continue
            sync = nullcontext() if not ddp or micro == gas - 1 else model.no_sync()
            with sync, autocast:
                try:
                    _, loss = model(X, Y)
                except Exception as e:  # compile failures surface on the first call: fall back, loudly
                    if not use_compile or iter_num != start_iter:
                        raise
                    _say_compile_failed(cfg['model_type'], e)
                    use_compile, model = False, raw_model if not ddp else DDP(raw_model)
                    _, loss = model(X, Y)
                loss = loss / gas
            loss.backward()
        if cfg['grad_clip'] > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg['grad_clip'])
        optimizer.step()
        if graphed is not None:
            graphed.zero_grad()  # the graph accumulates into these very tensors: keep them, zeroed
        else:
            optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        window_iters += 1

        if iter_num % cfg['log_interval'] == 0 or iter_num == max_iters:
            last_loss = loss.item() * gas  # the sync point of this window
            now = time.time()
            if not math.isfinite(last_loss):
                raise NonFiniteLoss(f"loss is {last_loss} at iteration {iter_num} ({cfg['model_type']}, "
                                    f"lr {cfg['learning_rate']}); stopping. The last good checkpoint is {ckpt_last}")
            if window_t0 is not None:
                dt = (now - window_t0) / window_iters
                window_times.append(dt)
                mfu = raw_model.estimate_mfu(gas * cfg['batch_size'], dt, peak) if peak else None  # per GPU
                eta = run_eta(dt, iter_num, max_iters, cfg['eval_interval'], prev['eval_s'] + eval_s,
                              prev['n_evals'] + n_evals)
                log({'kind': 'train', 'iter': iter_num, 'loss': last_loss, 'lr': lr, 'ms_per_iter': dt * 1000,
                     'mfu': mfu})
                if master:
                    print(f"iter {iter_num}/{max_iters}: loss {last_loss:.4f}, {dt * 1000:.2f} ms/iter"
                          + (f", mfu {mfu * 100:.1f}%" if mfu is not None else '') + f", eta {fmt_time(eta)}")
            window_t0, window_iters = now, 0

    # the first timed window of each segment includes compilation/autotuning; leave those out when there are others
    run = so_far()
    times = ([t for seg in run['window_times'] for t in seg[1:]]
             or [t for seg in run['window_times'] for t in seg])
    median_dt = float(np.median(times)) if times else float('nan')
    summary = {
        'model_type': cfg['model_type'], 'learning_rate': cfg['learning_rate'], 'seed': cfg['seed'],
        'preset': cfg['preset'], 'best_val_loss': best_val, 'best_iter': best_iter,
        'final_train_loss': losses['train'], 'final_val_loss': losses['val'], 'iters': iter_num,
        # summed over the segments of a resumed run (each up to the checkpoint the next resumed from)
        'wall_s': round(run['wall_s'], 2), 'train_s': round(run['train_s'], 2), 'eval_s': round(run['eval_s'], 2),
        'segments': run['segments'],
        'median_ms_per_iter': median_dt * 1000, 'tokens_per_s': tokens_per_iter / median_dt if times else None,
        'n_params': n_params, 'out_dir': out_dir, 'status': 'done',
        **run['ran'],  # compile, cuda_graphs: as the steps ran (after any fallback)
    }
    if master and not cfg['eval_only']:  # an evaluation-only pass never replaces a training run's summary
        atomic_write_json(summary, summary_path)
        print(f"done: best val loss {best_val:.4f} at iter {best_iter}, {summary['wall_s']:.0f}s wall, "
              f"median {median_dt * 1000:.2f} ms/iter")
    if wandb_run is not None:
        wandb_run.summary.update(summary)
        wandb_run.finish()
    if ddp:
        import torch.distributed as dist
        # every rank leaves together: without it the other ranks tear down while rank 0 still evaluates and
        # writes (seconds), and gloo has once aborted a rank at that point in CI (SIGABRT; not reproduced)
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _fault_point(name, iter_num):
    """Test hook (tests/test_faults.py): FAULT_AT='<name>:iter=<N>' ends the process on the spot, as kill -9
    would (os._exit: no cleanup, no flush), at the point of train() called <name> at iteration N."""
    if os.environ.get('FAULT_AT') == f'{name}:iter={iter_num}':
        os._exit(1)


def _say_compile_failed(model_type, e):
    print(f"torch.compile failed for {model_type} ({type(e).__name__}: {model_lib.first_line(e)}); "
          f"falling back to eager mode")


def _gather_rng_states(data_gen, device_type, ddp):
    """Every rank's RNG states (rank order), so a resumed run continues each rank's streams exactly."""
    mine = {'data': data_gen.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    if not ddp:
        return [mine]
    import torch.distributed as dist
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


# ----------------------------------------------------------------------------------------------
# the reproduction: 4 models x learning rates (x seeds), then every benchmark, then the report

PRESETS = {
    # the repository's setting, on a GPU: nanoGPT's shakespeare_char shape, 3000 iterations
    'full': dict(
        train=dict(max_iters=3000, batch_size=64, block_size=256, eval_interval=250, log_interval=10,
                   eval_iters=10, eval_batch_size=256, dropout=0.2, warmup_iters=100),
        models={},
        lrs=[5e-4, 1e-3, 3e-3],
    ),
    # CPU: sized like nanoGPT's laptop recipe (4 layers, 128 wide, context 64, batch 12): minutes per
    # model on a few cores. Models keep the solved-d_ff parameter matching at this width.
    'cpu': dict(
        train=dict(max_iters=2000, batch_size=12, block_size=64, eval_interval=250, log_interval=50,
                   eval_iters=10, eval_batch_size=64, dropout=0.0, warmup_iters=100,
                   n_layer=4, n_embd=128),
        models={'vanilla': dict(n_head=4), 'delta': dict(n_head=4, head_dim=32),
                'delta_product': dict(n_head=4, head_dim=32),
                # the full config's proportions at T=64 (8 blocks, 4 selected, window T/4); blocks of 8 are
                # below the GPU kernel's minimum tile, so this preset names the PyTorch path it runs anyway
                'nsa': dict(n_head=16, n_kv_head=1, head_dim=16, nsa_block_size=8, nsa_block_counts=4,
                            nsa_window_size=16, backend='torch')},
        lrs=[5e-4, 1e-3, 3e-3],
    ),
}
SWEEP_KEYS = dict(preset='auto', seeds=1, models=','.join(model_lib.MODEL_TYPES), lrs='', results_dir='',
                  bench=True, gpus=1)
# overrides that change no number a run produces, or only through rounding (how it is executed; a discrete
# choice such as NSA's top-k can amplify that): they don't turn a preset into a custom one
NEUTRAL_KEYS = {'wandb_log', 'wandb_project', 'wandb_run_name', 'log_interval', 'device', 'compile', 'cuda_graphs'}


def sweep(overrides=None):
    """The whole reproduction. Resumable: finished runs with the same config are not trained again.
    Everything it prints also goes to <results_dir>/sweep.log (appended to by a resumed sweep)."""
    with _SweepLog() as log:
        return _sweep(overrides, log)


def _sweep(overrides, log):
    overrides = dict(overrides or {})
    opts = {k: overrides.pop(k, v) for k, v in SWEEP_KEYS.items()}
    owned = sorted(set(overrides) & {'model_type', 'learning_rate', 'seed', 'out_dir', 'preset', 'init_from'})
    if owned:
        raise ConfigError(f"the sweep sets {owned} itself; use --models, --lrs, --seeds, --results_dir, --preset "
                          f"(or give a config file to train a single run)")
    cuda = pick_device(overrides.get('device', 'auto')).startswith('cuda')
    preset = opts['preset'] if opts['preset'] != 'auto' else ('full' if cuda else 'cpu')
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid choices: auto, {', '.join(PRESETS)}")
    P = PRESETS[preset]
    models = as_list(opts['models'], str)
    for m in models:
        model_lib.get_model_module(m)  # fail now, naming the valid choices, not after an hour of training
    lrs = as_list(opts['lrs'], float) if opts['lrs'] else P['lrs']
    seeds = [1337 + i for i in range(int(opts['seeds']))]
    # --lrs with the preset's own LRs, in another order, is still the preset (the order is the training order)
    custom = bool(set(overrides) - NEUTRAL_KEYS) or sorted(lrs) != sorted(P['lrs'])
    label = preset + ('-custom' if custom else '')
    results_dir = opts['results_dir'] or os.path.join(HERE, 'results', label)
    runs = [(m, lr, s) for m in models for lr in lrs for s in seeds]
    print(f"reproduction: preset {label!r} ({'CUDA' if cuda else 'no CUDA: the CPU preset, nanoGPT laptop-sized'}), "
          f"{len(models)} models x {len(lrs)} LRs x {len(seeds)} seeds = {len(runs)} runs -> {results_dir}")
    if not cuda and preset == 'full':
        print("warning: --preset=full on CPU: full-size models, expect hours")

    gpus = int(opts['gpus'])
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    if gpus > 1 and (not cuda or gpus > torch.cuda.device_count()):
        raise ConfigError(f"--gpus={gpus} but this machine has {torch.cuda.device_count() if cuda else 0} CUDA "
                          f"GPU(s); valid: 1..{max(1, torch.cuda.device_count() if cuda else 1)}")

    called = None if os.path.abspath(sys.argv[0]) == os.path.abspath(__file__) else \
        {**{k: v for k, v in opts.items() if v != SWEEP_KEYS[k]}, **overrides}  # from Python, not the CLI
    log.open(os.path.join(results_dir, 'sweep.log'), called)
    t0, summaries, todo = time.time(), {}, []
    for i, (m, lr, seed) in enumerate(runs):
        out_dir = os.path.join(results_dir, 'runs', f"{m}-lr{lr:g}-s{seed}")
        run_cfg = {**P['train'], **P['models'].get(m, {}), **overrides, 'model_type': m, 'learning_rate': lr,
                   'seed': seed, 'out_dir': out_dir, 'preset': label}
        wanted = resolve_config(None, run_cfg)
        prev = load_json(os.path.join(out_dir, 'summary.json'))
        prev_cfg = (load_json(os.path.join(out_dir, 'config.json')) or {}).get('config', {})
        same = all(prev_cfg.get(k) == v for k, v in wanted.items() if k not in NEUTRAL_KEYS | {'init_from'})
        if prev and prev.get('status') in ('done', 'diverged') and same:
            print(f"run {i + 1}/{len(runs)} {m} lr={lr:g} seed={seed}: already {prev['status']} ({out_dir}), "
                  f"best val loss {prev['best_val_loss']:.4f}; skipping")
            summaries[i] = prev
            continue
        resume = same and os.path.exists(os.path.join(out_dir, 'ckpt_last.pt'))
        todo.append((i, {**run_cfg, 'init_from': 'resume' if resume else 'scratch'}))

    eta = _SweepEta()
    for m in dict.fromkeys(c['model_type'] for _, c in todo):  # a few timed iterations of each model to train
        c = next(c for _, c in todo if c['model_type'] == m)
        if resolve_config(None, c)['max_iters'] >= 10 * PROBE_ITERS:  # (not worth it for a smoke test)
            eta.probe[m] = _probe(c)
    first, t_train = None, time.time()
    if eta.probe:
        left = eta.left([c['model_type'] for _, c in todo])
        first = left / gpus if left else None
        print(f"training estimate: {fmt_time(first) if first else 'unknown'} for {len(todo)} runs; per run: "
              + ', '.join(f"{m} {fmt_time(v) if v else 'unknown'}" for m, v in eta.probe.items())
              + f" (from an eager run of {PROBE_ITERS} iterations of each model, {fmt_time(time.time() - t0)})")

    def progress(n_done, left_models):
        left = eta.left(left_models)
        return (f"{n_done}/{len(todo)} runs to train done | elapsed {fmt_time(time.time() - t0)}"
                + (f", eta {fmt_time(left / gpus)}" if left else ''))

    if gpus == 1:
        for n, (i, run_cfg) in enumerate(todo):
            print(f"\n=== run {i + 1}/{len(runs)}: {run_cfg['model_type']} lr={run_cfg['learning_rate']:g} "
                  f"seed={run_cfg['seed']} | {progress(n, [c['model_type'] for _, c in todo[n:]])} ===")
            t_run = time.time()
            summaries[i] = _sweep_run(run_cfg)
            if summaries[i]['status'] == 'done' and run_cfg['init_from'] == 'scratch':  # a whole run's time
                eta.add(run_cfg['model_type'], time.time() - t_run)
    else:
        # independent runs, one process per GPU (spawned, each sees only its GPU); each run's console
        # output goes to <out_dir>/train.log. Every run is seeded on its own, so the records are the same
        # as one after another (timings aside).
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = mp.get_context('spawn')
        free_gpus = ctx.Queue()
        for g in range(gpus):
            free_gpus.put(g)
        print(f"training {len(todo)} runs on {gpus} GPUs, one run per GPU at a time; logs in <run>/train.log")
        with ProcessPoolExecutor(gpus, mp_context=ctx, initializer=_pin_gpu, initargs=(free_gpus,)) as pool:
            started = {pool.submit(_sweep_run, run_cfg, True): (i, run_cfg) for i, run_cfg in todo}
            running = dict(started)
            for n, fut in enumerate(as_completed(started), 1):
                i, run_cfg = running.pop(fut)
                try:
                    summaries[i] = s = fut.result()
                except BaseException:  # stop now, as the one-GPU sweep does, not after every queued run
                    print(f"run {i + 1}/{len(runs)} failed; see {os.path.join(run_cfg['out_dir'], 'train.log')}")
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                if s['status'] == 'done' and run_cfg['init_from'] == 'scratch':
                    eta.add(run_cfg['model_type'], s['wall_s'])
                print(f"run {i + 1}/{len(runs)} {run_cfg['model_type']} lr={run_cfg['learning_rate']:g} "
                      f"seed={run_cfg['seed']}: {s['status']}, best val loss {s['best_val_loss']:.4f} "
                      f"| {progress(n, [c['model_type'] for c in running.values()])}", flush=True)
    summaries = [summaries[i] for i in sorted(summaries)]
    if todo:  # how the estimate did
        took = time.time() - t_train
        print(f"\ntraining: {len(todo)} runs in {fmt_time(took)} ({took:.0f}s)" + (
            f"; the first estimate was {fmt_time(first)} ({first:.0f}s), {first / took:.2f}x" if first else ''))

    bench_out = None
    if opts['bench']:
        print(f"\n=== benchmarks and report -> {results_dir} ===", flush=True)
        t_bench = time.time()
        bench_out = run_benchmarks(results_dir, label, overrides.get('wandb_log', False))
        print(f"benchmarks and report: {fmt_time(time.time() - t_bench)}")
        failed = {k: v for k, v in bench_out.items() if str(v).startswith('failed')}
        if failed:
            raise RuntimeError(f"benchmark step(s) failed: {failed}")
    total = time.time() - t0
    print(f"\nreproduction finished in {fmt_time(total)} ({total:.0f}s); results in {results_dir}")
    return {'preset': label, 'results_dir': results_dir, 'runs': summaries, 'wall_s': total, 'bench': bench_out}


PROBE_ITERS, PROBE_EVAL_ITERS = 8, 2  # the sweep's ETA probe of each model: iterations, eval batches per split


def _probe(run_cfg):
    """Seconds a run of run_cfg should take, from PROBE_ITERS iterations of it (eager: on CUDA an estimate
    until a run of the model finishes) with an evaluation of PROBE_EVAL_ITERS batches per split at the start
    and the end, in a scratch folder, output hidden: its ms/iter and time per eval batch, times the run's
    iterations and eval batches. (Not its startup: the first train() of a process pays one-time costs,
    imports and data loading, that the runs don't.) None if the probe fails (the run will say why)."""
    import io
    import shutil
    import tempfile
    from contextlib import redirect_stdout
    cfg, tmp = resolve_config(None, run_cfg), tempfile.mkdtemp(prefix='eta-probe-')
    try:
        with redirect_stdout(io.StringIO()):
            s = train(None, {**run_cfg, 'out_dir': tmp, 'init_from': 'scratch', 'max_iters': PROBE_ITERS,
                             'eval_interval': PROBE_ITERS, 'eval_iters': PROBE_EVAL_ITERS, 'log_interval': 1,
                             'compile': False, 'cuda_graphs': False, 'wandb_log': False})
    except Exception as e:
        print(f"ETA probe of {run_cfg['model_type']} failed ({type(e).__name__}: {model_lib.first_line(e)})")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the sweep's runs (and a multi-GPU sweep's workers) get the probe's memory back
    n, ei = cfg['max_iters'], cfg['eval_interval']
    eval_batches = 2 * cfg['eval_iters'] * (n // ei + 1 + (n % ei != 0))  # 2 splits; step 0, every ei, the last
    return n * s['median_ms_per_iter'] / 1e3 + eval_batches * s['eval_s'] / (2 * 2 * PROBE_EVAL_ITERS)


class _SweepEta:
    """The sweep's ETA: each run to come estimated from its own model's speed: the mean time of that model's
    runs finished in this sweep; before one has, its probe, scaled by how the finished runs of other models
    compared with theirs (on CUDA the probe runs eagerly, the runs compiled); without a probe, the mean of
    all finished runs."""

    def __init__(self):
        self.probe, self.measured = {}, {}

    def add(self, model_type, seconds):
        self.measured.setdefault(model_type, []).append(seconds)

    def run(self, model_type):
        if model_type in self.measured:
            return float(np.mean(self.measured[model_type]))
        scale = [np.mean(v) / self.probe[m] for m, v in self.measured.items() if self.probe.get(m)]
        if self.probe.get(model_type):
            return self.probe[model_type] * (float(np.mean(scale)) if scale else 1.0)
        every = [t for v in self.measured.values() for t in v]
        return float(np.mean(every)) if every else None

    def left(self, model_types):
        """Seconds for runs of these model types, one after another (None while any is unknown)."""
        est = [self.run(m) for m in model_types]
        return None if any(e is None for e in est) else sum(est)


class _Tee:
    """A stream that also hands its complete lines to a sweep log. A line redrawn with carriage returns (a
    progress bar) reaches the log in its last state."""

    def __init__(self, stream, log):
        self.stream, self.log, self.line = stream, log, ''

    def write(self, text):
        self.stream.write(text)
        *lines, self.line = (self.line + text).split('\n')
        for line in lines:
            self.log.write(line.rsplit('\r', 1)[-1] + '\n')
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def end(self):
        last = self.line.rsplit('\r', 1)[-1]
        if last.strip():
            self.log.write(last + '\n')
        return self.stream


class _SweepLog:
    """sys.stdout and sys.stderr of a sweep (its runs and the benchmark process included), copied to
    <results_dir>/sweep.log. What is printed before open() names the file is kept and written first; an
    exception that ends the sweep is written last."""

    def __init__(self):
        self.file, self.kept = None, []

    def __enter__(self):
        self.streams = sys.stdout, sys.stderr
        self.tees = sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def open(self, path, overrides=None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, 'a', buffering=1)
        how = f"train_runner.sweep({overrides!r})" if overrides is not None else \
            f"python {' '.join(['train_runner.py'] + sys.argv[1:])}"
        self.file.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {how} =====\n" + ''.join(self.kept))
        self.kept = []

    def write(self, line):
        (self.file.write if self.file else self.kept.append)(line)

    def flush(self):
        if self.file:
            self.file.flush()

    def __exit__(self, kind, exc, tb):
        for tee in self.tees:
            tee.end()
        sys.stdout, sys.stderr = self.streams
        if self.file:
            if exc is not None:
                import traceback
                self.file.write(''.join(traceback.format_exception(kind, exc, tb)))
            self.file.close()
        return False


def run_benchmarks(results_dir, preset, wandb_log=False):
    """`python bench.py all` over the sweep's results, in a process of its own (bench and train_runner don't
    import each other, and the benchmarks start with a fresh CUDA context). Its output is passed through
    line by line (so it reaches whatever sys.stdout is); returns bench's {step: status}."""
    cmd = [sys.executable, os.path.join(HERE, 'bench.py'), 'all', f'--out={results_dir}',
           f"--runs_dir={os.path.join(results_dir, 'runs')}", f'--preset={preset}', f'--wandb_log={wandb_log}']
    status = None
    with subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as p:
        for line in p.stdout:
            print(line, end='', flush=True)
            if line.startswith('[bench] {'):
                status = json.loads(line[len('[bench] '):])
    if status is None:
        status = {'bench': f'failed: exit {p.returncode} before reporting its steps'}
    return status


def _pin_gpu(free_gpus):
    """Sweep worker initialiser: this process sees one GPU only (set before CUDA is initialised): the
    g-th of those the parent sees (CUDA_VISIBLE_DEVICES, if set, chooses them)."""
    g = free_gpus.get()
    visible = [d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    os.environ['CUDA_VISIBLE_DEVICES'] = visible[g] if visible else str(g)


def _sweep_run(run_cfg, log_to_file=False):
    """One sweep run; a diverging LR is recorded ('diverged') rather than raised. log_to_file: console
    output to <out_dir>/train.log (a worker of a multi-GPU sweep)."""
    from contextlib import redirect_stderr, redirect_stdout
    log = None
    if log_to_file:
        os.makedirs(run_cfg['out_dir'], exist_ok=True)
        log = open(os.path.join(run_cfg['out_dir'], 'train.log'), 'a', buffering=1)
    try:
        with (redirect_stdout(log) if log else nullcontext()), (redirect_stderr(log) if log else nullcontext()):
            try:
                return train(None, run_cfg)
            except NonFiniteLoss as e:  # one diverging LR must not stop the reproduction; the record says so
                print(f"diverged: {e}")
                return _diverged_summary(run_cfg, str(e))
    finally:
        if log:
            log.close()


def _diverged_summary(run_cfg, why):
    """summary.json for a run stopped by a non-finite loss: status 'diverged' and its best val loss so far
    (the bake-off ranks finished runs only), so a rerun of the sweep doesn't hit the same NaN again."""
    out_dir = run_cfg['out_dir']
    evals = []
    if os.path.exists(os.path.join(out_dir, 'metrics.jsonl')):
        with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
            evals = [r for r in map(json.loads, f) if r['kind'] == 'eval']
    best = min(evals, key=lambda r: r['val_loss']) if evals else None
    summary = {'model_type': run_cfg['model_type'], 'learning_rate': run_cfg['learning_rate'],
               'seed': run_cfg['seed'], 'preset': run_cfg['preset'], 'status': 'diverged', 'reason': why,
               'best_val_loss': best['val_loss'] if best else float('nan'), 'best_iter': best['iter'] if best else -1,
               'iters': evals[-1]['iter'] if evals else 0, 'out_dir': out_dir}
    atomic_write_json(summary, os.path.join(out_dir, 'summary.json'))
    return summary


def main(argv):
    try:
        config_file, overrides = parse_cli(argv)
        if config_file is None and not {'model_type'} & set(overrides):
            sweep(overrides)
        else:
            train(config_file, overrides)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:  # ConfigError is a ValueError
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if type(e).__name__ != 'DatasetError':  # data/<dataset>/prepare.py's clear-message error
            raise
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main(sys.argv[1:])
