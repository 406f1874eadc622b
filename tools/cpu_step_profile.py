"""Where a CPU-preset training step's time goes, per model: the step of `python train_runner.py` without CUDA
(the 'cpu' preset: 4 layers, 128 wide, batch 12 x context 64, the PyTorch references), timed and profiled on
this machine's CPU at a given number of torch threads (1: each of the two runs side by side on 2 cores).

A step here is what train() runs per iteration: forward and loss, backward, grad-norm clip, AdamW, zero_grad,
on random tokens of the vocabulary's size (65), after runtime.keep_freed_memory() as train() calls it on CPU
(--malloc=default leaves glibc's defaults). Its median over --steps steps, then torch.profiler's self CPU
time over --profiled steps, summed by kind of op (ops as the profiler lists them: an op that calls others, and
views, count too, so the counts are of dispatched ops, not of kernels; the profiler's own cost per op is inside
each op's self time, which inflates it for steps of many small ops); GFLOP/s is model.flops_per_token's count
(the matmuls, attention over the full T x T square) over the median step.

    python tools/cpu_step_profile.py --threads=1 > results/cpu-reproduction/step-profile/profile.txt
"""
import argparse
import collections
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as model_lib  # noqa: E402
import runtime  # noqa: E402
import train_runner  # noqa: E402

GROUPS = [  # (group, aten op names, matched whole after 'aten::'); the first match wins
    ('matmul (mm, bmm, addmm, linear)', r'mm|bmm|addmm|baddbmm|addbmm|matmul|linear|_mkldnn.*|mkldnn.*'),
    ('triangular solves (the chunked references)', r'linalg_solve_triangular|triangular_solve'),
    ('attention (SDPA on CPU)', r'.*scaled_dot_product.*'),
    ('elementwise (mul, add, exp, gates, activations, softmax)',
     r'(mul|add|sub|div|exp|neg|rsqrt|sqrt|pow|silu|gelu|sigmoid|softplus|where|tril|triu|clamp|maximum|minimum|'
     r'log|tanh|masked_fill|lerp|addcmul|addcdiv|abs|sign|reciprocal|eq|ne|lt|le|gt|ge|logical_\w+|bitwise_\w+|'
     r'native_dropout|bernoulli|_softmax|softmax)_?|(silu|gelu|sigmoid|softplus|tanh|threshold|pow|'
     r'native_dropout)_backward|_softmax_backward_data'),
    ('copies, fills, cat, pad, embedding', r'copy_|fill_|zero_|cat|stack|constant_pad_nd|clone|contiguous|_to_copy|'
                                           r'index\w*|scatter\w*|gather|embedding\w*|empty\w*|zeros\w*|ones\w*|'
                                           r'new_\w+|full\w*'),
    ('reductions, norms, loss, cumsum', r'(sum|mean|norm|linalg_vector_norm|cumsum|max|min|amax|native_layer_norm|'
                                        r'_fused_rms_norm|rms_norm|var|std|topk|sort|argmax|_log_softmax|nll_loss\w*|'
                                        r'logsumexp)(_backward\w*)?'),
]


def build(model_type, threads):
    torch.set_num_threads(threads)
    P = train_runner.PRESETS['cpu']
    overrides = {**P['train'], **P['models'].get(model_type, {}), 'model_type': model_type, 'device': 'cpu'}
    cfg = train_runner.resolve_config(None, overrides)
    mcfg = {k: cfg[k] for k in train_runner.model_keys(model_type)}
    mcfg['vocab_size'] = 65  # shakespeare_char's
    torch.manual_seed(0)
    m = model_lib.build_model(**mcfg).train()  # mcfg holds model_type
    opt = m.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']), 'cpu')
    B, T = cfg['batch_size'], cfg['block_size']
    x, y = torch.randint(0, 65, (B, T)), torch.randint(0, 65, (B, T))

    def step():
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), cfg['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return m, step, B, T


def group_of(name):
    if name.startswith('Optimizer') or '_foreach' in name:
        return 'optimizer (AdamW foreach, grad clip)'
    op = name.split('::', 1)[-1]
    return next((g for g, rx in GROUPS if re.fullmatch(rx, op)), 'other (views, metadata, the rest)')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', default='vanilla,delta,delta_product,nsa')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--steps', type=int, default=40)
    ap.add_argument('--profiled', type=int, default=10)
    ap.add_argument('--malloc', choices=('keep', 'default'), default='keep',
                    help="keep: runtime.keep_freed_memory() first, as train() does on CPU; default: glibc's defaults")
    a = ap.parse_args()
    if a.malloc == 'keep':
        runtime.keep_freed_memory()
    from torch.profiler import ProfilerActivity, profile
    print(f"torch {torch.__version__}, {a.threads} thread(s), malloc {a.malloc}, CPU preset step, median of {a.steps} "
          f"steps after 5 warm-up, profile of {a.profiled} more (self CPU time, ms per step)")
    for mt in a.models.split(','):
        m, step, B, T = build(mt, a.threads)
        for _ in range(5):
            step()
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts) * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.profiled):
                step()
        sums, calls = collections.defaultdict(float), collections.defaultdict(int)
        for e in prof.key_averages():
            if not e.key.startswith('aten::') and not e.key.startswith('Optimizer'):
                continue  # autograd nodes and profiler ranges: their ops are counted themselves
            g = group_of(e.key)
            sums[g] += e.self_cpu_time_total / 1e3 / a.profiled
            calls[g] += e.count / a.profiled
        total = sum(sums.values())
        gflops = m.flops_per_token(T) * B * T / (med / 1e3) / 1e9
        print(f"\n{mt}: {m.get_num_params() / 1e6:.3f}M parameters, median step {med:.1f} ms "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}), {gflops:.1f} GFLOP/s of model FLOPs; "
              f"profiled ops {total:.1f} ms per step")
        for g in [g for g, _ in GROUPS] + ['optimizer (AdamW foreach, grad clip)', 'other (views, metadata, the rest)']:
            if sums[g]:
                print(f"  {sums[g]:8.1f} ms  {calls[g]:7.0f} ops  {g}")
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        print("  largest ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / a.profiled:.1f} ms "
                                            f"({e.count // a.profiled}x)" for e in top))


if __name__ == '__main__':
    main()
