"""Each mixer's flops_per_token (the FLOPs axis of the bake-off, and MFU) against torch's own FLOP counter
(torch.utils.flop_counter.FlopCounterMode) run on the mixer's PyTorch reference path, at two context
lengths. CPU only.

What the counter sees: matmul-type ops (mm, addmm, bmm, baddbmm, convolutions, SDPA's fused kernels; einsum
reaches it as bmm), 2 FLOPs per multiply-add. It does not count elementwise work (softmax, norms, gates,
the shifted-sum short convs, RoPE, mean pooling, sums), which the formulas leave out too: they count matmul
FLOPs only, intra-chunk and attention squares in full (vanilla's T x T, not halved for causality).
It knows no triangular solve either: that one is registered here (TRIANGULAR_SOLVE).

The formulas count what the CUDA kernels run in the forward; where the PyTorch reference computes the same
function with other matmuls, the difference is named below (KERNEL_ONLY), one term per mixer with its
reason, and nothing else is allowed beyond TOL."""

import math

import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
import model_delta as md
import model_delta_product as dp
import model_nsa as M

TOL = 1e-3  # relative: the integer divisions in the formulas (c * c // 3); any missing term is >= 1%
CONTEXTS = (128, 512)  # multiples of the 64-token chunks (the references pad to whole chunks) and past
                       # NSA's selected span (4 x 16) and window (24), so every branch is at full size


def _triangular_solve_flops(a_shape, b_shape, *args, out_shape=None, **kwargs):
    """linalg_solve_triangular(A (..., C, C), B (..., C, N)) counted as the kernels compute the same
    product: a matmul of the (explicitly inverted) triangular matrix with B, 2 C^2 N per batch entry.
    The inversion itself is not a matmul of this graph: see KERNEL_ONLY."""
    C, N = a_shape[-1], b_shape[-1]
    return 2 * math.prod(b_shape[:-2]) * C * C * N


TRIANGULAR_SOLVE = {torch.ops.aten.linalg_solve_triangular: _triangular_solve_flops}


def counted_per_token(mixer, run, n_tokens):
    """FLOPs the counter sees while run() executes, less the projections' 2 * (Linear weights) per token
    (the 2N of 6N that GPT.flops_per_token adds separately), per token."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=TRIANGULAR_SOLVE) as counter:
        run()
    linear = sum(m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    return (counter.get_total_flops() - 2 * linear * n_tokens) / n_tokens


def tiny_mixer(mod, **kw):
    torch.manual_seed(0)
    extra = {} if mod is model else {'backend': 'torch'}
    cfg = mod.GPTConfig(**{**mod.TINY, **extra, 'block_size': max(CONTEXTS), **kw})
    return mod.GPT(cfg).transformer.h[0].mixer.eval(), cfg


def kernel_only_delta(mx, T):
    """The kernel inverts each chunk's unit-triangular (I + L) (solve_tril, ~c^3/3 per chunk: c^2/3 per
    token and head) and then multiplies; the reference's triangular solve is counted as that multiply."""
    c = min(mx.chunk_size, T)
    return mx.n_head * (c * c // 3)


def kernel_only_delta_product(mx, T):
    """As for DeltaNet, the inversion of (I + A), once per chunk of c sub-steps: n_h * c^2/3 per token and
    head. And the reverse: the reference interleaves the queries with zeros (a query at every sub-step, only
    the last one's output kept), so it reads the state S^T q n_h times per token; the kernel reads it once:
    -(n_h - 1) * 2 Dk Dv."""
    n, H = mx.num_householder, mx.n_head
    c = min(64, T * n)
    return H * (n * (c * c // 3) - (n - 1) * 2 * mx.head_k_dim * mx.head_v_dim)


def kernel_only_nsa(mx, T):
    """fla's top-k kernel recomputes the compression scores q . k_cmp (2 D per complete block and query
    head) rather than keeping the compression kernel's; the reference ranks the probabilities it has."""
    return mx.n_head * 2 * mx.head_dim * (T // mx.block_size)


def run_vanilla(mx, cfg, T):
    x = torch.randn(1, T, cfg.n_embd)
    def run():
        with sdpa_kernel(SDPBackend.MATH):  # CPU's fused SDPA kernel is not in the counter's table
            mx(x)
    return run, T


def run_full(mx, cfg, T):
    x = torch.randn(1, T, cfg.n_embd)
    return (lambda: mx(x)), T


def run_delta_product(mx, cfg, T):
    """The reference in the kernel's chunks of 64 sub-steps (its own default is 32, faster on CPU): the
    FLOPs counted are then those of the kernel's chunking, which flops_per_token describes."""
    x = torch.randn(1, T, cfg.n_embd)
    ref = dp.chunk_gated_delta_product_ref

    def run():
        dp.chunk_gated_delta_product_ref = functools.partial(ref, chunk_size=64)
        try:
            mx(x)
        finally:
            dp.chunk_gated_delta_product_ref = ref
    return run, T


def run_nsa_decoding(mx, cfg, T):
    """NSA through its sparse reference, the decoding path over the caches: a one-token prefill, then
    T - 1 tokens at pos 1 (nsa_cached reads only the compressed blocks, the selected blocks' tokens and the
    window, as the kernel does). The whole-sequence reference masks dense T x T scores instead, whose
    FLOPs are not the algorithm's. Per query: the context of the last one, T tokens, as for vanilla."""
    x = torch.randn(1, T, cfg.n_embd)
    state = mx.init_state(1, T, 'cpu', x.dtype)
    with torch.no_grad():
        mx(x[:, :1], state=state, pos=0)
    return (lambda: mx(x[:, 1:], state=state, pos=1)), T - 1


CASES = {
    'vanilla': (model, run_vanilla, lambda mx, T: 0),
    'delta': (md, run_full, kernel_only_delta),
    'delta_product': (dp, run_delta_product, kernel_only_delta_product),
    'nsa': (M, run_nsa_decoding, kernel_only_nsa),
}


@pytest.mark.parametrize('T', CONTEXTS)
@pytest.mark.parametrize('model_type', list(CASES))
def test_flops_per_token_matches_the_counter(model_type, T):
    mod, make_run, kernel_only = CASES[model_type]
    mx, cfg = tiny_mixer(mod)
    run, n_tokens = make_run(mx, cfg, T)
    counted = counted_per_token(mx, run, n_tokens)
    want = counted + kernel_only(mx, T)
    got = mx.flops_per_token(T)
    assert isinstance(got, int)
    assert abs(got - want) <= TOL * want, (model_type, T, got, want, counted)

