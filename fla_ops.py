"""fla's kernels as torch.library custom ops, so that torch.compile traces each model as one graph.

fla's public functions are autograd.Functions behind @torch.compiler.disable. Dynamo stops at each one, so a
compiled training step falls apart into compiled pieces glued together by eager autograd: about 1.4 ms of
DeltaNet's 9.7 ms step on the H200 (results/PERF.md). A custom op is opaque to Dynamo but not a break:
its fake implementation gives the output shapes, its backward is a second custom op, and AOTAutograd
builds one forward+backward graph in which Inductor fuses the elementwise glue around the kernels.

  chunk_delta_rule(q, k, v, beta, scale, h0, output_final_state)        DeltaNet (fla's ChunkDeltaRuleFunction)
  chunk_gated_delta_product(q, k, v, g, beta, scale, n_h, h0, final)    Gated DeltaProduct
  causal_conv1d_silu(x, weight)                                         both models' short convs (CausalConv1dFunction)

Each runs fla's own Function.forward and Function.backward with a stand-in ctx, so outputs and gradients
are fla's bit for bit (tests/test_fla_ops.py checks it on CUDA). What fla's forward saves and its backward
needs, beyond the op's inputs (the L2-normalised q and k, their rstd, the WY matrix A, the gates'
cumulative sums), leaves the forward op as extra outputs: that keeps both ops functional, which
torch.compile and CUDA graphs require.

NSA is not here. fla's parallel_nsa chains five autograd Functions (mean pooling, compression, top-k,
selection, and flash-attn's or fla's window), and a backward op cannot re-run them under autograd (inside a
custom op autograd is off), so NSA needs each of the five wrapped like the two above; until then it runs
eagerly under the CUDA graph (model_nsa.GPT.compile_problem says why).

The short convs are an op too. Their shifted-sum form (model_delta.short_conv) is plain PyTorch, which
Inductor fuses; but in the compiled step it was slower than fla's conv kernel: with the shifted sums and
the two ops above, DeltaNet's step went from 9.26 to 9.71 ms and Gated DeltaProduct's from 12.87 to 14.93
(results/training-speedups/custom-ops/), about what moving to fla's conv had once saved. Vanilla
attention is PyTorch's SDPA. fla is imported inside the implementations, on CUDA only.
"""
import functools
import os
from typing import Optional

import torch
from torch import Tensor

NS = 'bakeoff'  # the ops' namespace: torch.ops.bakeoff.*


def import_fla(module, name):
    """fla's `name` from `module`, imported when an op first runs (on CUDA only: fla.ops needs Triton), or an
    ImportError that says what to install and what runs without it."""
    import importlib
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
