"""Gated DeltaProduct's chunked reference at the CPU preset's shapes, the committed one against a variant
(dp-reference-variant.patch applied to a copy of model_delta_product.py), timed in one process, in turn.

    cp model_delta_product.py /tmp/variant.py && patch /tmp/variant.py results/cpu-reproduction/step-profile/dp-reference-variant.patch
    python results/cpu-reproduction/step-profile/dp_reference_ab.py /tmp/variant.py

Prints the largest difference of the output, the final state and each input's gradient, then per variant the
median and fastest of 40 calls of the reference's fwd+bwd alone (one layer's: B 12, T 64, 4 heads of 32,
n_h 2), then of 30 whole training steps of the CPU preset's model with each reference in turn, at one thread."""
import importlib.util
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tools')]
import cpu_step_profile  # noqa: E402
import model_delta as md  # noqa: E402
import model_delta_product as mdp  # noqa: E402
import runtime  # noqa: E402


def load(path):
    spec = importlib.util.spec_from_file_location('variant', path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.chunk_gated_delta_product_ref


def main():
    runtime.keep_freed_memory()
    torch.set_num_threads(1)
    refs = {'committed': mdp.chunk_gated_delta_product_ref, 'variant': load(sys.argv[1])}
    B, T, H, D, n = 12, 64, 4, 32, 2
    torch.manual_seed(0)
    ins = [torch.randn(B, T, H, D), torch.randn(B, T * n, H, D), torch.randn(B, T * n, H, D), -torch.rand(B, T, H),
           torch.rand(B, T * n, H)]
    ins = [t.requires_grad_() for t in ins]

    def call(f):
        q, k, v, g, beta = ins
        o, S = f(md.l2norm(q), md.l2norm(k), v, g, beta, D ** -0.5, num_householder=n)
        (o.sum() + S.sum()).backward()
        grads = [t.grad for t in ins]
        for t in ins:
            t.grad = None
        return [o.detach(), S.detach()] + grads

    want, got = call(refs['committed']), call(refs['variant'])
    print('max |variant - committed|, o S dq dk dv dg dbeta:',
          ' '.join(f"{(a - b).abs().max().item():.2e}" for a, b in zip(got, want)))

    def timed(fn, n_calls):
        ts = {name: [] for name in refs}
        for _ in range(n_calls):
            for name, f in refs.items():
                t0 = time.perf_counter()
                fn(f)
                ts[name].append(time.perf_counter() - t0)
        return ', '.join(f"{name} {statistics.median(t) * 1e3:.1f} ms (fastest {min(t) * 1e3:.1f})"
                         for name, t in ts.items())

    timed(call, 5)
    print('the reference fwd+bwd, median of 40 in turn:', timed(call, 40))
    _, step, _, _ = cpu_step_profile.build('delta_product', 1)

    def step_with(f):
        mdp.chunk_gated_delta_product_ref = f
        step()
    timed(step_with, 3)
    print('the training step, median of 30 in turn:', timed(step_with, 30))


if __name__ == '__main__':
    main()
