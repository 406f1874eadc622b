"""fla's kernels as torch.library custom ops, so that torch.compile traces each model as one graph.

fla's public functions are autograd.Functions behind @torch.compiler.disable. Dynamo stops at each one, so a
compiled training step falls apart into compiled pieces glued together by eager autograd: about 1.4 ms of
DeltaNet's 9.7 ms step on the H200 (results/PERF.md). A custom op is opaque to Dynamo but not a break:
its fake implementation gives the output shapes, its backward is a second custom op, and AOTAutograd
builds one forward+backward graph in which Inductor fuses the elementwise glue around the kernels.

  chunk_delta_rule(q, k, v, beta, scale, h0, output_final_state)        DeltaNet (fla's ChunkDeltaRuleFunction)
  chunk_gated_delta_product(q, k, v, g, beta, scale, n_h, h0, final)    Gated DeltaProduct
  causal_conv1d_silu(x, weight)                                         both models' short convs (CausalConv1dFunction)
  parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, ...)                       NSA (five ops, below)

Each runs fla's own Function.forward and Function.backward with a stand-in ctx, so outputs and gradients
are fla's bit for bit (tests/test_fla_ops.py checks it on CUDA). What fla's forward saves and its backward
needs, beyond the op's inputs (the L2-normalised q and k, their rstd, the WY matrix A, the gates'
cumulative sums), leaves the forward op as extra outputs: that keeps both ops functional, which
torch.compile and CUDA graphs require.

NSA's parallel_nsa is not one Function but a composition: mean pooling of k and v, the compression
branch, the top-k choice of blocks, the selection branch, and the window (flash-attn's or fla's
parallel_attn). Each of its four autograd Functions is an op pair below, the top-k a forward-only op, and
parallel_nsa() composes them as fla's parallel_nsa does, with the same gating arithmetic, so that its output
and gradients are fla's bit for bit, except where fla's own backward is not deterministic (the selection's
dk, dv accumulate in an order its atomics set; tests/test_fla_ops.py). One step of their backwards is ours: the
row sums of dO * O (row_dot, below: the same sum, many rows per Triton program where fla's kernel takes one),
so NSA's gradients are fla's up to that sum's rounding; with ROW_DOT = False they are fla's bits.

  mean_pooling(x, block_size)                                          (MeanPoolingFunction)
  nsa_compression(q, k_cmp, v_cmp, T, block_size, scale) -> o, lse     (ParallelNSACompressionFunction)
  nsa_topk(q, k_cmp, lse, T, block_counts, block_size, scale)          (parallel_nsa_topk, no gradient)
  nsa_selection(q, k, v, block_indices, block_counts, block_size, scale) (ParallelNSAFunction)
  window_attn(q, k, v, scale, window_size)                             (ParallelAttentionFunction)

The short convs are an op too. Their shifted-sum form (model_delta.short_conv) is plain PyTorch, which
Inductor fuses; but in the compiled step it was slower than fla's conv kernel: with the shifted sums and
the two ops above, DeltaNet's step went from 9.26 to 9.71 ms and Gated DeltaProduct's from 12.87 to 14.93
(results/training-speedups/custom-ops/), about what moving to fla's conv had once saved. With fla's conv as
the op below DeltaNet's step is 9.39 ms again (results/training-speedups/conv-op/). Vanilla
attention is PyTorch's SDPA. fla is imported inside the implementations, on CUDA only.
"""
import contextlib
import functools
import importlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

NS = 'bakeoff'  # the ops' namespace: torch.ops.bakeoff.*


def import_fla(module, name):
    """fla's `name` from `module`, imported when an op first runs (on CUDA only: fla.ops needs Triton), or an
    ImportError that says what to install and what runs without it."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(f"the fla backend needs flash-linear-attention and Triton (pip install fla-core; "
                          f"{e}); use backend='torch' to run the PyTorch reference instead") from e


class _Ctx:
    """What an autograd.Function's forward and backward see as ctx: saved tensors and attributes.
    torch.amp.custom_fwd (fla's autocast_custom_fwd) writes _dtype and _fwd_used_autocast on it;
    custom_bwd reads them back."""

    def __init__(self, saved=(), **attrs):
        self.saved_tensors = tuple(saved)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _forward_autocast():
    """The forward's autocast dtype on CUDA, or None: what fla's custom_fwd records for its backward. It
    is passed to the backward op explicitly: autograd may run the backward on another thread, whose
    autocast state is not the forward's."""
    return torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else None


def _autocast_attrs(autocast):
    # torch.amp.custom_bwd re-enters the forward's autocast state from these
    return dict(_fwd_used_autocast=autocast is not None, _dtype=autocast or torch.bfloat16)


def _or_empty(t, like):
    """Custom ops cannot return None: an absent state is a 0-element tensor."""
    return like.new_empty(0) if t is None else t


def _or_none(t):
    return None if t is None or t.numel() == 0 else t


def _state_grad(dht):
    """The final state's gradient for fla's backward: None where no state was returned. Autograd hands
    the 0-element stand-in a 0-element zero gradient, which fla would read as a (B, H, K, V) one, out of
    bounds (an illegal memory access on the H200)."""
    return None if dht is None or dht.numel() == 0 else dht.contiguous()


# ----------------------------------------------------------------------------- DeltaNet: chunk_delta_rule

@torch.library.custom_op(f'{NS}::chunk_delta_rule_fwd', mutates_args=(), device_types='cuda')
def _delta_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Optional[Tensor], scale: float,
               output_final_state: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ChunkDeltaRuleFunction = import_fla('fla.ops.delta_rule.chunk', 'ChunkDeltaRuleFunction')
    ctx = _Ctx()
    o, ht = ChunkDeltaRuleFunction.forward(ctx, q, k, v, beta, scale, h0, output_final_state, True)
    qn, q_rstd, kn, k_rstd, _v, _beta, A = ctx.saved_tensors[:7]
    return o, _or_empty(ht, q), qn, q_rstd, kn, k_rstd, A


@_delta_fwd.register_fake
def _(q, k, v, beta, h0, scale, output_final_state):
    B, T, H, K = q.shape
    ht = q.new_empty(B, H, K, v.size(-1), dtype=torch.float32) if output_final_state else q.new_empty(0)
    rstd = q.new_empty(B, T, H, dtype=torch.float32)
    return (v.new_empty(*v.shape, dtype=q.dtype), ht, torch.empty_like(q), rstd, torch.empty_like(k),
            torch.empty_like(rstd), k.new_empty(B, T, H, 64))


@torch.library.custom_op(f'{NS}::chunk_delta_rule_bwd', mutates_args=(), device_types='cuda')
def _delta_bwd(do: Tensor, dht: Optional[Tensor], qn: Tensor, q_rstd: Tensor, kn: Tensor, k_rstd: Tensor,
               v: Tensor, beta: Tensor, A: Tensor, h0: Optional[Tensor], scale: float,
               autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ChunkDeltaRuleFunction = import_fla('fla.ops.delta_rule.chunk', 'ChunkDeltaRuleFunction')
    ctx = _Ctx((qn, q_rstd, kn, k_rstd, v, beta, A, h0, None, None), scale=scale, chunk_size=64,
               use_qk_l2norm_in_kernel=True, **_autocast_attrs(autocast))
    dq, dk, dv, db, _, dh0 = ChunkDeltaRuleFunction.backward(ctx, do, dht)[:6]
    return dq, dk, dv, db, _or_empty(dh0, qn)


@_delta_bwd.register_fake
def _(do, dht, qn, q_rstd, kn, k_rstd, v, beta, A, h0, scale, autocast):
    return (torch.empty_like(qn), torch.empty_like(kn), torch.empty_like(v), torch.empty_like(beta),
            qn.new_empty(0) if h0 is None else torch.empty_like(h0))


def _delta_setup(ctx, inputs, output):
    q, k, v, beta, h0, scale, _ = inputs
    _, _, qn, q_rstd, kn, k_rstd, A = output
    ctx.save_for_backward(qn, q_rstd, kn, k_rstd, v, beta, A, h0)
    ctx.scale, ctx.autocast = scale, _forward_autocast()


def _delta_backward(ctx, do, dht, *_saved_grads):
    qn, q_rstd, kn, k_rstd, v, beta, A, h0 = ctx.saved_tensors
    dq, dk, dv, db, dh0 = _delta_bwd(do.contiguous(), _state_grad(dht), qn, q_rstd, kn,
                                     k_rstd, v, beta, A, h0, ctx.scale, ctx.autocast)
    return dq, dk, dv, db, None if h0 is None else dh0, None, None


_delta_fwd.register_autograd(_delta_backward, setup_context=_delta_setup)


def chunk_delta_rule(q, k, v, beta, scale, initial_state=None, output_final_state=False):
    """fla's chunk_delta_rule(..., use_qk_l2norm_in_kernel=True) as a custom op: (o, final state or None).
    q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H) in bf16/fp16; initial_state (B, H, K, V) fp32."""
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))  # fla's input_guard would copy; do it outside
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _delta_fwd(q, k, v, beta, h0, scale, output_final_state)[:2]
    return o, ht if output_final_state else None


# ----------------------------------------------------------------------------- Gated DeltaProduct

@torch.compiler.disable
def gated_backward_problem():
    """None if fla's gated chunk backward can run here, else why not and how to fix it. Mirrors fla's
    own rule: on Hopper with Triton >= 3.4.0 and < 3.7.1 its Triton chunk_bwd_dqkwg raises (wrong
    results, fla issue #640) unless the dispatcher picks the TileLang backend instead. Cached per value
    of the two environment variables fla reads at call time."""
    return _fla_gated_backward_problem_cached(os.environ.get('FLA_TILELANG'),
                                              os.environ.get('FLA_DISABLE_BACKEND_DISPATCH'))


@functools.lru_cache(maxsize=None)
def _fla_gated_backward_problem_cached(fla_tilelang_env, fla_disable_dispatch_env):
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return None
    import triton
    from fla.ops.common.backends.tilelang import CommonTileLangBackend
    from fla.utils import find_spec_cached, has_usable_nvcc
    if fla_disable_dispatch_env == '1':
        why = 'FLA_DISABLE_BACKEND_DISPATCH=1 turns fla\'s TileLang backend off'
    elif find_spec_cached('tilelang') is None:
        why = 'the tilelang package is not installed'
    elif not has_usable_nvcc():
        why = 'tilelang is installed but fla finds no nvcc for its JIT (set CUDA_HOME, or put nvcc on PATH)'
    elif not CommonTileLangBackend().is_enabled():
        why = 'FLA_TILELANG=0 turns fla\'s TileLang backend off'
    else:
        return None
    return (f"fla's gated chunk backward cannot run here: Triton {triton.__version__} on a Hopper GPU computes "
            f"wrong gradients in chunk_bwd_dqkwg, and fla's TileLang replacement is unusable because {why}. "
            f"Fix: `pip install tilelang` (with a CUDA toolkit's nvcc), or upgrade to Triton >= 3.7.1, "
            f"or use backend='torch' (slow reference), or run without gradients (inference).")


@torch.library.custom_op(f'{NS}::chunk_gated_delta_product_fwd', mutates_args=(), device_types='cuda')
def _gdp_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor, h0: Optional[Tensor],
             scale: float, num_householder: int,
             output_final_state: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ChunkGatedDeltaProductFunction = import_fla('fla.ops.gated_delta_product.chunk', 'ChunkGatedDeltaProductFunction')
    ctx = _Ctx()
    o, ht = ChunkGatedDeltaProductFunction.forward(ctx, q, k, v, g, beta, scale, num_householder, h0,
                                                   output_final_state, True)
    qn, q_rstd, kn, k_rstd, _v, g_cum, _beta, A = ctx.saved_tensors[:8]
    return o, _or_empty(ht, q), qn, q_rstd, kn, k_rstd, _or_empty(g_cum, q), A


@_gdp_fwd.register_fake
def _(q, k, v, g, beta, h0, scale, num_householder, output_final_state):
    B, T, H, K = q.shape
    Tn = k.size(1)  # T * num_householder sub-steps
    ht = q.new_empty(B, H, K, v.size(-1), dtype=torch.float32) if output_final_state else q.new_empty(0)
    g_cum = q.new_empty(0) if g is None else q.new_empty(B, Tn, H, dtype=torch.float32)
    return (q.new_empty(B, T, H, v.size(-1)), ht, torch.empty_like(q), q.new_empty(B, T, H, dtype=torch.float32),
            torch.empty_like(k), k.new_empty(B, Tn, H, dtype=torch.float32), g_cum, k.new_empty(B, Tn, H, 64))


@torch.library.custom_op(f'{NS}::chunk_gated_delta_product_bwd', mutates_args=(), device_types='cuda')
def _gdp_bwd(do: Tensor, dht: Optional[Tensor], qn: Tensor, q_rstd: Tensor, kn: Tensor, k_rstd: Tensor, v: Tensor,
             g_cum: Tensor, beta: Tensor, A: Tensor, h0: Optional[Tensor], scale: float, num_householder: int,
             autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ChunkGatedDeltaProductFunction = import_fla('fla.ops.gated_delta_product.chunk', 'ChunkGatedDeltaProductFunction')
    if _or_none(g_cum) is not None:
        problem = gated_backward_problem()  # say why, rather than fla's assert
        if problem:
            raise RuntimeError(problem)
    ctx = _Ctx((qn, q_rstd, kn, k_rstd, v, _or_none(g_cum), beta, A, h0, None, None), scale=scale,
               use_qk_l2norm_in_kernel=True, num_householder=num_householder, cp_context=None,
               **_autocast_attrs(autocast))
    dq, dk, dv, dg, db, _, _, dh0 = ChunkGatedDeltaProductFunction.backward(ctx, do, dht)[:8]
    return dq, dk, dv, _or_empty(dg, qn), db, _or_empty(dh0, qn)


@_gdp_bwd.register_fake
def _(do, dht, qn, q_rstd, kn, k_rstd, v, g_cum, beta, A, h0, scale, num_householder, autocast):
    B, T, H, _ = qn.shape
    dg = qn.new_empty(0) if g_cum.numel() == 0 else qn.new_empty(B, T, H, dtype=torch.float32)
    return (torch.empty_like(qn), torch.empty_like(kn), torch.empty_like(v), dg, torch.empty_like(beta),
            qn.new_empty(0) if h0 is None else torch.empty_like(h0))


def _gdp_setup(ctx, inputs, output):
    q, k, v, g, beta, h0, scale, n, _ = inputs
    _, _, qn, q_rstd, kn, k_rstd, g_cum, A = output
    ctx.save_for_backward(qn, q_rstd, kn, k_rstd, v, g_cum, beta, A, h0)
    ctx.scale, ctx.n, ctx.autocast, ctx.gated = scale, n, _forward_autocast(), g is not None


def _gdp_backward(ctx, do, dht, *_saved_grads):
    qn, q_rstd, kn, k_rstd, v, g_cum, beta, A, h0 = ctx.saved_tensors
    dq, dk, dv, dg, db, dh0 = _gdp_bwd(do.contiguous(), _state_grad(dht), qn, q_rstd, kn,
                                       k_rstd, v, g_cum, beta, A, h0, ctx.scale, ctx.n, ctx.autocast)
    return dq, dk, dv, dg if ctx.gated else None, db, None if h0 is None else dh0, None, None, None


_gdp_fwd.register_autograd(_gdp_backward, setup_context=_gdp_setup)


def chunk_gated_delta_product(q, k, v, g, beta, scale, num_householder, initial_state=None,
                              output_final_state=False):
    """fla's chunk_gated_delta_product(..., use_qk_l2norm_in_kernel=True) as a custom op: (o, final state
    or None). q (B, T, H, K); k, v, beta over the T * n_h sub-steps; g (B, T, H) fp32 or None."""
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _gdp_fwd(q, k, v, g, beta, h0, scale, num_householder, output_final_state)[:2]
    return o, ht if output_final_state else None


# ----------------------------------------------------------------------------- the short convs: causal_conv1d

def _conv_ctx(x, weight):
    _has_non_standard_layout = import_fla('fla.modules.causal_conv1d.ops', '_has_non_standard_layout')
    return _Ctx((x, weight, None, None, None), activation='silu', cu_seqlens=None, cu_seqlens_cpu=None,
                chunk_indices=None, layout_fallback=_has_non_standard_layout(x=x))


@torch.library.custom_op(f'{NS}::causal_conv1d_silu_fwd', mutates_args=(), device_types='cuda')
def _conv_fwd(x: Tensor, weight: Tensor) -> Tensor:
    CausalConv1dFunction = import_fla('fla.modules.causal_conv1d.ops', 'CausalConv1dFunction')
    y, _ = CausalConv1dFunction.forward(_Ctx(), x, weight, None, None, None, False, 'silu')
    return y.contiguous()  # fla allocates it contiguous; said here, since the fake must promise the same


@_conv_fwd.register_fake
def _(x, weight):
    return x.new_empty(x.shape)


@torch.library.custom_op(f'{NS}::causal_conv1d_silu_bwd', mutates_args=(), device_types='cuda')
def _conv_bwd(dy: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    CausalConv1dFunction = import_fla('fla.modules.causal_conv1d.ops', 'CausalConv1dFunction')
    dx, dw = CausalConv1dFunction.backward(_conv_ctx(x, weight), dy, None)[:2]
    return dx.contiguous(), dw  # dx: empty_like(x), contiguous for a strided x, and so in the fake


@_conv_bwd.register_fake
def _(dy, x, weight):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    return _conv_bwd(dy, x, weight)


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv1d_silu(x, weight):
    """fla's causal_conv1d(x, weight, activation='silu') (Triton, the SiLU fused) as a custom op: x (B, T, C),
    which may be a strided view (a slice of a wider matmul's output); weight (C, K). Returns (B, T, C)."""
    return _conv_fwd(x, weight.contiguous())


# ----------------------------------------------------------------------------- NSA: parallel_nsa's pieces
# fla's Functions below take cu_seqlens=None (no variable-length batches here); their forwards save
# (q, k, v, o, lse), which leave the forward ops as outputs (o and lse are outputs anyway).

# ----------------------------------------------------------------------------- NSA's backward: the row sums
# Each of fla's three attention backwards below (compression, selection, window) begins with
# parallel_attn_bwd_preprocess: delta = sum_v O * dO in fp32 for each (b, t, head) row, one Triton program per
# row of 32 values. At B 64 x T 256 x 16 heads that is 262,144 programs and 159 us a call, 2.86 ms in 18 launches
# of NSA's 14.18 ms compiled step (results/training-speedups/gate-apart-and-nsa-compiled/). row_dot() is the same
# sum with many rows per program, and the backward ops below run fla's backward with it in the preprocess's place.
# The same products summed in another order: delta may differ in its last bit, the gradients by bf16 rounding.
# ROW_DOT = False keeps fla's own preprocess (the tests compare the ops with fla's direct calls bit for bit so).
ROW_DOT = True
_PREPROCESS_SITES = ('fla.ops.attn.parallel', 'fla.ops.nsa.parallel', 'fla.ops.nsa.compression')


@functools.cache
def _row_dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_dot_kernel(o, do, delta, N, V: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # BR rows of V values, row-major
        cols = tl.arange(0, BV)
        mask = (rows < N)[:, None] & (cols < V)[None, :]
        at = rows[:, None] * V + cols[None, :]
        b_o = tl.load(o + at, mask=mask, other=0)
        b_do = tl.load(do + at, mask=mask, other=0).to(tl.float32)  # o * do in fp32, as fla's kernel
        tl.store(delta + rows, tl.sum(b_o * b_do, axis=1), mask=rows < N)
    return row_dot_kernel


def row_dot(o, do, rows_per_program=64):
    """sum(o * do, -1) in fp32 for o, do (..., V), the products in fp32: the function of fla's
    parallel_attn_bwd_preprocess(o, do), with `rows_per_program` rows in each Triton program instead of one."""
    import triton
    if rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program must be a power of two (a Triton block), got {rows_per_program}")
    o, do = o.contiguous(), do.contiguous()
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    N, V = delta.numel(), o.size(-1)
    _row_dot_kernel()[(triton.cdiv(N, rows_per_program),)](o, do, delta, N, V=V, BV=triton.next_power_of_2(V),
                                                            BR=rows_per_program)
    return delta


_row_dot_on = threading.local()  # set by _fla_row_dot() in the thread that runs a backward op


def _preprocess(fla_preprocess):
    """What fla's modules call in its preprocess's place once installed: row_dot() inside _fla_row_dot() in this
    thread, fla's own everywhere else (its direct calls, other threads)."""
    def preprocess(o, do):
        return row_dot(o, do) if getattr(_row_dot_on, 'on', False) else fla_preprocess(o, do)
    preprocess.fla_preprocess = fla_preprocess
    return preprocess


@contextlib.contextmanager
def _fla_row_dot():
    """fla's attention backwards with row_dot() as their preprocess, in this thread, for the duration of one call.
    Each module that calls the preprocess looks the name up in its own namespace when it runs; the switch is
    installed there once, and only this thread's flag turns it on."""
    if not ROW_DOT:
        yield
        return
    for name in _PREPROCESS_SITES:
        m = importlib.import_module(name)
        if not hasattr(m.parallel_attn_bwd_preprocess, 'fla_preprocess'):
            m.parallel_attn_bwd_preprocess = _preprocess(m.parallel_attn_bwd_preprocess)
    _row_dot_on.on = True
    try:
        yield
    finally:
        _row_dot_on.on = False


def _nsa(name):
    return import_fla('fla.ops.nsa.parallel', name)


@torch.library.custom_op(f'{NS}::mean_pooling_fwd', mutates_args=(), device_types='cuda')
def _pool_fwd(x: Tensor, block_size: int) -> Tensor:
    MeanPoolingFunction = import_fla('fla.ops.utils.pooling', 'MeanPoolingFunction')
    return MeanPoolingFunction.forward(_Ctx(), x, block_size, None)


@_pool_fwd.register_fake
def _(x, block_size):
    B, T, H, D = x.shape
    return x.new_empty(B, -(-T // block_size), H, D)


@torch.library.custom_op(f'{NS}::mean_pooling_bwd', mutates_args=(), device_types='cuda')
def _pool_bwd(do: Tensor, T: int, block_size: int, autocast: Optional[torch.dtype]) -> Tensor:
    MeanPoolingFunction = import_fla('fla.ops.utils.pooling', 'MeanPoolingFunction')
    ctx = _Ctx(batch_size=do.size(0), seq_len=T, chunk_size=block_size, cu_seqlens=None, **_autocast_attrs(autocast))
    return MeanPoolingFunction.backward(ctx, do)[0]


@_pool_bwd.register_fake
def _(do, T, block_size, autocast):
    B, _, H, D = do.shape
    return do.new_empty(B, T, H, D)


def _pool_setup(ctx, inputs, output):
    x, block_size = inputs
    ctx.T, ctx.block_size, ctx.autocast = x.size(1), block_size, _forward_autocast()


def _pool_backward(ctx, do):
    return _pool_bwd(do.contiguous(), ctx.T, ctx.block_size, ctx.autocast), None


_pool_fwd.register_autograd(_pool_backward, setup_context=_pool_setup)


def _attn_like_fake(q, v):
    """(o, lse) of an attention kernel: o (B, T, HQ, V) in q's dtype, lse (B, T, HQ) fp32."""
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v.size(-1)), q.new_empty(B, T, HQ, dtype=torch.float32)


def _grads_fake(q, k, v):
    """dq, dk, dv: fla allocates them afresh, contiguous, whatever the inputs' layout."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _nsa_ctx(q, k, v, o, lse, block_size, scale, autocast, **attrs):
    return _Ctx((q, k, v, o, lse), cu_seqlens=None, token_indices=None, block_size=block_size, scale=scale,
                tq_ne_tk=False, dtype=q.dtype, **attrs, **_autocast_attrs(autocast))


@torch.library.custom_op(f'{NS}::nsa_compression_fwd', mutates_args=(), device_types='cuda')
def _cmp_fwd(q: Tensor, k: Tensor, v: Tensor, T: int, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    Function = import_fla('fla.ops.nsa.compression', 'ParallelNSACompressionFunction')
    o, lse = Function.forward(_Ctx(), q, k, v, T, block_size, scale, None)
    return o, lse


@_cmp_fwd.register_fake
def _(q, k, v, T, block_size, scale):
    return _attn_like_fake(q, v)


@torch.library.custom_op(f'{NS}::nsa_compression_bwd', mutates_args=(), device_types='cuda')
def _cmp_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block_size: int, scale: float,
             autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    Function = import_fla('fla.ops.nsa.compression', 'ParallelNSACompressionFunction')
    with _fla_row_dot():
        dq, dk, dv = Function.backward(_nsa_ctx(q, k, v, o, lse, block_size, scale, autocast), do)[:3]
    return dq, dk, dv


@_cmp_bwd.register_fake
def _(do, q, k, v, o, lse, block_size, scale, autocast):
    return _grads_fake(q, k, v)


def _cmp_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse: read by no gradient
    q, k, v, _, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.block_size, ctx.scale, ctx.autocast = block_size, scale, _forward_autocast()


def _cmp_backward(ctx, do, _dlse):  # lse feeds only the top-k, which has no gradient
    dq, dk, dv = _cmp_bwd(do.contiguous(), *ctx.saved_tensors, ctx.block_size, ctx.scale, ctx.autocast)
    return dq, dk, dv, None, None, None


_cmp_fwd.register_autograd(_cmp_backward, setup_context=_cmp_setup)


@torch.library.custom_op(f'{NS}::nsa_topk', mutates_args=(), device_types='cuda')
def _topk(q: Tensor, k: Tensor, lse: Tensor, T: int, block_counts: int, block_size: int, scale: float) -> Tensor:
    return _nsa('parallel_nsa_topk')(q=q, k=k, lse=lse, TK=T, block_counts=block_counts, block_size=block_size,
                                     scale=scale, cu_seqlens=None)


@_topk.register_fake
def _(q, k, lse, T, block_counts, block_size, scale):
    B, TQ, _, _ = q.shape
    S = 1 << max(block_counts - 1, 0).bit_length()  # triton.next_power_of_2
    return q.new_empty(B, TQ, k.size(2), S, dtype=torch.int32)


@torch.library.custom_op(f'{NS}::nsa_selection_fwd', mutates_args=(), device_types='cuda')
def _slc_fwd(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: int, block_size: int,
             scale: float) -> tuple[Tensor, Tensor]:
    ctx = _Ctx()
    o = _nsa('ParallelNSAFunction').forward(ctx, q, k, v, block_indices, block_counts, block_size, scale, None)
    return o, ctx.saved_tensors[4]  # (o, lse); o is the saved o (both in v's dtype, which is q's)


@_slc_fwd.register_fake
def _(q, k, v, block_indices, block_counts, block_size, scale):
    return _attn_like_fake(q, v)


@torch.library.custom_op(f'{NS}::nsa_selection_bwd', mutates_args=(), device_types='cuda')
def _slc_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block_indices: Tensor,
             block_counts: int, block_size: int, scale: float,
             autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    ctx = _nsa_ctx(q, k, v, o, lse, block_size, scale, autocast, block_indices=block_indices,
                   block_counts=block_counts)
    with _fla_row_dot():
        dq, dk, dv = _nsa('ParallelNSAFunction').backward(ctx, do)[:3]
    return dq, dk, dv


@_slc_bwd.register_fake
def _(do, q, k, v, o, lse, block_indices, block_counts, block_size, scale, autocast):
    return _grads_fake(q, k, v)


def _slc_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse: read by no gradient
    q, k, v, block_indices, block_counts, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, *output, block_indices)
    ctx.block_counts, ctx.block_size, ctx.scale, ctx.autocast = block_counts, block_size, scale, _forward_autocast()


def _slc_backward(ctx, do, _dlse):
    q, k, v, o, lse, block_indices = ctx.saved_tensors
    dq, dk, dv = _slc_bwd(do.contiguous(), q, k, v, o, lse, block_indices, ctx.block_counts, ctx.block_size,
                          ctx.scale, ctx.autocast)
    return dq, dk, dv, None, None, None, None


_slc_fwd.register_autograd(_slc_backward, setup_context=_slc_setup)


@torch.library.custom_op(f'{NS}::window_attn_fwd', mutates_args=(), device_types='cuda')
def _swa_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, window_size: int) -> tuple[Tensor, Tensor]:
    Function = import_fla('fla.ops.attn.parallel', 'ParallelAttentionFunction')
    ctx = _Ctx()
    o = Function.forward(ctx, q, k, v, None, None, scale, window_size, None, None)
    return o, ctx.saved_tensors[5]  # (o, lse)


@_swa_fwd.register_fake
def _(q, k, v, scale, window_size):
    return _attn_like_fake(q, v)


@torch.library.custom_op(f'{NS}::window_attn_bwd', mutates_args=(), device_types='cuda')
def _swa_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float, window_size: int,
             autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    Function = import_fla('fla.ops.attn.parallel', 'ParallelAttentionFunction')
    ctx = _Ctx((q, k, v, o, None, lse, None), scale=scale, window_size=window_size, cu_seqlens=None,
               dtype=q.dtype, **_autocast_attrs(autocast))
    with _fla_row_dot():
        dq, dk, dv = Function.backward(ctx, do)[:3]
    return dq, dk, dv


@_swa_bwd.register_fake
def _(do, q, k, v, o, lse, scale, window_size, autocast):
    return _grads_fake(q, k, v)


def _swa_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse: read by no gradient
    q, k, v, scale, window_size = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.window_size, ctx.autocast = scale, window_size, _forward_autocast()


def _swa_backward(ctx, do, _dlse):
    dq, dk, dv = _swa_bwd(do.contiguous(), *ctx.saved_tensors, ctx.scale, ctx.window_size, ctx.autocast)
    return dq, dk, dv, None, None


_swa_fwd.register_autograd(_swa_backward, setup_context=_swa_setup)


def parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale, block_indices=None,
                 flash_attn_func=None):
    """What model_nsa computed with fla's functions, through the ops above: fla's parallel_nsa(q, k, v,
    g_cmp, g_slc, g_swa if flash_attn_func else None, block_indices, block_counts, block_size, window_size if
    flash_attn_func else 0, scale), then, without flash-attn, fla's parallel_attn(window_size) times g_swa added
    last. q (B, T, HQ, D), k and v (B, T, H, D), all of one 16-bit dtype; the gates (B, T, HQ), all three given;
    block_counts an int; block_indices (B, T, H, S) or None (the top-k chooses). flash_attn_func: flash-attn's,
    for the window as parallel_nsa runs it (its default scale); passed in, since an import inside a compiled
    function would break the graph. The gating arithmetic is fla's, in its order, so the output rounds as
    fla's does. q, k and v are made contiguous once and every branch reads those copies: for the contiguous
    inputs the mixer passes, gradients accumulate as in fla's calls too."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t.contiguous() for t in (q, k, v))  # parallel_nsa's @contiguous
    T = k.size(1)
    k_cmp, v_cmp = _pool_fwd(k, block_size), _pool_fwd(v, block_size)
    o_cmp, lse_cmp = _cmp_fwd(q, k_cmp, v_cmp, T, block_size, scale)
    if block_indices is None:  # the choice of blocks carries no gradient (in fla neither)
        block_indices = _topk(q.detach(), k_cmp.detach(), lse_cmp.detach(), T, block_counts, block_size, scale)
    o_slc = _slc_fwd(q, k, v, block_indices.contiguous(), block_counts, block_size, scale)[0]
    o = torch.addcmul(o_slc * g_slc.unsqueeze(-1), o_cmp, g_cmp.unsqueeze(-1))
    if window_size > 0 and flash_attn_func is not None:
        o = torch.addcmul(o, flash_attn_func(q, k, v, causal=True, window_size=(window_size - 1, 0)),
                          g_swa.unsqueeze(-1))
    elif window_size > 0:
        o = o + _swa_fwd(q, k, v, scale, window_size)[0] * g_swa.unsqueeze(-1)
    return o
