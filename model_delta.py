"""
DeltaNet (Yang et al., NeurIPS 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"): the GPT skeleton of model.py with a delta-rule token mixer.

Per head, with L2-normalised keys k_t, values v_t and a write strength beta_t in (0, 1), the mixer
keeps a fast-weight memory S (Dk x Dv, laid out like fla's states: S[key dim, value dim]) and does

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      (delta rule: replace what k_t stored)
    o_t = S_t^T (scale * q_t)                                    (read with the query)

which is the paper's S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t with S
transposed. The recipe around it follows fla's DeltaNet layer (fla/layers/delta_net.py): q/k/v
projections without bias, each through a causal depthwise conv (kernel 4) + SiLU; q and k
L2-normalised per head; beta = sigmoid(Linear(C -> n_head)), or 2 * sigmoid(...) with allow_neg_eigval
(beta in (0, 2): the transition I - beta k k^T then has eigenvalues in (-1, 1], which state tracking such as
parity needs; fla's layer doubles its sigmoid the same way); scale = 1/sqrt(head_dim) (the kernel's
default, which fla's layer uses); a per-head RMSNorm on the output; then c_proj. The references and the
kernel take beta as given, so they serve both ranges unchanged.

Three implementations of the delta rule live here:
  delta_rule_recurrent_ref   token-by-token loop: the oracle (and the T == 1 decoding step)
  delta_rule_chunk_ref       chunked WY/UT form, exact, written from the math: the CPU path for T > 1
  fla's chunk_delta_rule     Triton kernels (bf16 in, fp32 state), the CUDA path for T > 1
All use the (B, T, H, D) layout and states (B, H, Dk, Dv), like fla.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import fla_ops
import model
from model import D_FF_HELP, setting

L2NORM_EPS = 1e-6  # fla's l2norm (and so use_qk_l2norm_in_kernel): x / sqrt(sum(x^2) + eps)


# ----------------------------------------------------------------------------- delta rule, in PyTorch

def l2norm(x, eps=L2NORM_EPS):
    """x / sqrt(sum(x^2) + eps) over the last dim: the same formula as fla's in-kernel l2norm, so
    the CPU and CUDA paths normalise q and k identically."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _check_delta_inputs(q, k, v, beta):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"expected q, k (B, T, H, Dk), v (B, T, H, Dv), beta (B, T, H); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, beta {tuple(beta.shape)}")


def delta_rule_recurrent_ref(q, k, v, beta, scale=None, initial_state=None):
    """The delta rule token by token: the oracle. Used as the T == 1 decoding step too.

    q, k (B, T, H, Dk); v (B, T, H, Dv); beta (B, T, H); initial_state (B, H, Dk, Dv) or None.
    k is used as given (the caller L2-normalises it). Computes in q's dtype.
    Returns o (B, T, H, Dv) and the final state (B, H, Dk, Dv)."""
    _check_delta_inputs(q, k, v, beta)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype)
    o = []
    for t in range(T):
        q_t, k_t, v_t, b_t = q[:, t] * scale, k[:, t], v[:, t], beta[:, t, :, None]  # (B, H, D), b_t (B, H, 1)
        v_old = torch.einsum('bhk,bhkv->bhv', k_t, S)           # what S currently returns for k_t
        u_t = b_t * (v_t - v_old)                                # move it a fraction beta towards v_t
        S = S + k_t[..., :, None] * u_t[..., None, :]            # rank-1 write, out of place for autograd
        o.append(torch.einsum('bhk,bhkv->bhv', q_t, S))
    return torch.stack(o, dim=1), S


def delta_rule_chunk_ref(q, k, v, beta, scale=None, initial_state=None, chunk_size=64):
    """The delta rule in chunks (the paper's WY / UT-transform form), exact up to rounding.

    Within a chunk that starts from state S0, write the state after its r-th token as
        S_r = S0 + sum_{i<=r} k_i u_i^T,   u_i = beta_i (v_i - S_{i-1}^T k_i).
    Expanding S_{i-1} gives, in rows (U, K, V: (C, D) matrices of the chunk's u, k, v),
        U = diag(beta) V - diag(beta) K S0 - L U,   L = strictly-lower(diag(beta) K K^T),
    so with the unit lower-triangular system (I + L):
        W = (I + L)^{-1} diag(beta) K,   U' = (I + L)^{-1} diag(beta) V,   U = U' - W S0.
    W and U' depend on the chunk alone (computed for all chunks at once); only U = U' - W S0 and
        O = scale Q S0 + tril(scale Q K^T) U,     S_C = S0 + K^T U
    run sequentially over chunks. T need not be a multiple of chunk_size: the tail is zero-padded,
    and a padded token (beta = 0, k = 0) writes u = 0 and leaves the state alone.

    Same arguments and returns as delta_rule_recurrent_ref (plus chunk_size)."""
    _check_delta_inputs(q, k, v, beta)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
    # (B, N*C, H, D) -> (B, H, N, C, D)
    q, k, v = (x.transpose(1, 2).reshape(B, H, N, C, x.size(-1)) for x in (q, k, v))
    beta = beta.transpose(1, 2).reshape(B, H, N, C, 1)
    q = q * scale

    # WY representation of every chunk at once
    kb, vb = k * beta, v * beta                                               # diag(beta) K, diag(beta) V
    L = torch.tril(kb @ k.transpose(-1, -2), diagonal=-1)                     # (B, H, N, C, C)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    WU = torch.linalg.solve_triangular(L + eye, torch.cat([kb, vb], dim=-1), upper=False, unitriangular=True)
    W, U_ = WU[..., :Dk], WU[..., Dk:]                                        # (B, H, N, C, Dk), (..., Dv)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    QK = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)                    # (B, H, N, C, C), diagonal kept

    # chunk-level recurrence
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype)
    o = []
    for n in range(N):
        U = U_[:, :, n] - W[:, :, n] @ S                                     # (B, H, C, Dv)
        o.append(q[:, :, n] @ S + QK[:, :, n] @ U)                            # (B, H, C, Dv)
        S = S + k[:, :, n].transpose(-1, -2) @ U                              # (B, H, Dk, Dv)
    o = torch.stack(o, dim=2).reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)  # (B, T, H, Dv)
    return o, S


# ----------------------------------------------------------------------------- delta rule, fla kernel

def delta_rule_fla(q, k, v, beta, scale, initial_state=None, output_final_state=False, kernel_dtype=torch.bfloat16):
    """fla's chunk_delta_rule on raw (not yet normalised) q, k: the kernel L2-normalises them itself
    (use_qk_l2norm_in_kernel=True, as fla's DeltaNet layer does; same formula as l2norm() above), called
    through its custom op (fla_ops.py), which torch.compile traces without a graph break.
    The kernel has no fp32 mode, so q, k, v, beta go in as kernel_dtype; states stay fp32.
    Returns o (B, T, H, Dv) in kernel_dtype and the final state (fp32) or None."""
    q, k, v, beta = (x.to(kernel_dtype) for x in (q, k, v, beta))
    h0 = initial_state.float() if initial_state is not None else None
    return fla_ops.chunk_delta_rule(q, k, v, beta, scale, h0, output_final_state)


# ----------------------------------------------------------------------------- modules

class ShortConv(nn.Module):
    """Causal depthwise conv over time (kernel K) followed by SiLU (short_conv), with a decoding cache that
    holds the last K-1 inputs per channel. The delta-rule mixers keep one per q, k and v for their
    parameters and run the three as one conv (fused_short_conv)."""

    def __init__(self, channels, kernel_size=4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv1d's default init

    def forward(self, x, cache=None, fla=False):
        return short_conv(x, self.weight, cache, fla)

    def init_cache(self, batch_size, device, dtype):
        return fused_conv_cache([self], batch_size, device, dtype)


def short_conv(x, weight, cache=None, fla=False):
    """The causal depthwise conv + SiLU: x (B, T, C), weight (C, 1, K) -> (B, T, C). cache (B, K-1, C):
    the previous K-1 inputs, updated in place. x may be a view with strides (a slice of a wider matmul's
    output).

    y_t = silu(sum_j w_j * x_{t-K+1+j}). fla=True (CUDA, no cache: training and uncached forwards):
    fla's Triton causal_conv1d, one kernel forward and one backward with the SiLU fused, through its
    custom op (fla_ops.py), so compiled too: Inductor's fusion of the shifted sums below was slower in the
    compiled training step (results/training-speedups/custom-ops/). Otherwise (the CPU reference, and
    decoding with a cache) K shifted multiply-adds in the (B, T, C) layout, not F.conv1d, whose
    (B, C, T) transposes cost copies; torch.compile fuses them, and the decoding step (T = 1 with a
    cache) into one or two kernels."""
    B, T, C = x.shape
    K = weight.size(-1)
    if fla and cache is None:
        return fla_ops.causal_conv1d_silu(x, weight[:, 0, :])  # weight (C, K)
    if cache is None:
        xp = F.pad(x, (0, 0, K - 1, 0))                     # (B, K-1+T, C), zeros before the start
    else:
        xp = torch.cat([cache.to(x.dtype), x], dim=1)
        # the last K-1 inputs; a positive start index so that K == 1 (empty cache) works too
        cache.copy_(xp[:, xp.size(1) - (K - 1):])
    # accumulate in fp32 (fp64 for fp64), like a conv kernel; under torch.compile this is free
    acc = torch.promote_types(x.dtype, torch.float32)
    xp, w = xp.to(acc), weight[:, 0, :].to(acc)             # (B, K-1+T, C), (C, K)
    y = xp[:, K - 1:] * w[:, K - 1]
    for j in range(K - 1):
        y = y + xp[:, j:j + T] * w[:, j]
    return F.silu(y).to(x.dtype)


def fused_linear(x, linears):
    """x through several nn.Linear layers that read it, as one matmul: their weights (and biases, zeros
    where a layer has none) concatenated along the output dim; returns the concatenated output (..., sum
    of out_features). The parameters stay those of the separate layers (their initialisation, names and
    checkpoints); only the kernels change: one concatenation of the weights and one matmul where there
    were len(linears) matmuls. Why: a decoding step at batch 1 costs what its kernel count costs
    (results/PERF.md), and in training one wide matmul reads x once. The cost: the concatenated weight is
    not a parameter, so autocast's weight cache (eager steps) no longer covers its cast, and a graphed
    step concatenates the pre-cast copies on each replay (one small kernel per layer)."""
    w = torch.cat([lin.weight for lin in linears])
    b = None
    if any(lin.bias is not None for lin in linears):
        b = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                       for lin in linears])
    return F.linear(x, w, b)


def fused_short_conv(x, convs, cache=None, fla=False):
    """Several ShortConvs of the same kernel size over the concatenated channels of x, as one conv (one
    kernel, one cache of sum-of-channels width); the parameters stay the separate modules'."""
    return short_conv(x, torch.cat([c.weight for c in convs]), cache, fla)


def fused_conv_cache(convs, batch_size, device, dtype):
    return torch.zeros(batch_size, convs[0].kernel_size - 1, sum(c.weight.size(0) for c in convs),
                       device=device, dtype=dtype)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (one head's values), weight shared by heads; computed in fp32 (or
    fp64 for fp64 inputs), returned in the input's dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class DeltaNetMixer(nn.Module):
    """Multi-head delta-rule token mixer (see the module docstring)."""
    # a one-token step reads and writes fixed-size buffers (state, conv cache) and ignores pos: it can be
    # captured in a CUDA graph as it is (model.GraphedDecodeStep)
    static_decode = True

    def __init__(self, config, layer_idx=0):
        super().__init__()
        model.check_backend(config.backend)
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.backend = config.backend
        self.chunk_size = config.chunk_size
        self.allow_neg_eigval = config.allow_neg_eigval
        self.scale = config.head_dim ** -0.5  # fla's default scale (its DeltaNet layer passes none)
        inner = config.n_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, inner, bias=False)
        self.k_proj = nn.Linear(config.n_embd, inner, bias=False)
        self.v_proj = nn.Linear(config.n_embd, inner, bias=False)
        self.q_conv = ShortConv(inner, config.conv_size)
        self.k_conv = ShortConv(inner, config.conv_size)
        self.v_conv = ShortConv(inner, config.conv_size)
        self.b_proj = nn.Linear(config.n_embd, config.n_head, bias=False)
        self.o_norm = HeadRMSNorm(config.head_dim)
        self.c_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _use_fla(self, x):
        return model.use_fla(self.backend, x)

    @property
    def _in_projs(self):
        return [self.q_proj, self.k_proj, self.v_proj, self.b_proj]

    @property
    def _convs(self):
        return [self.q_conv, self.k_conv, self.v_conv]

    def forward(self, x, state=None, pos=0):
        B, T, C = x.size()
        H, D = self.n_head, self.head_dim
        conv_cache = state['conv'] if state is not None else None
        fla = self._use_fla(x)
        # the q, k, v, beta projections as one matmul and the q, k, v convs as one conv (fused_linear)
        qkv, b = fused_linear(x, self._in_projs).split([3 * H * D, H], dim=-1)
        q, k, v = fused_short_conv(qkv, self._convs, conv_cache, fla).split(H * D, dim=-1)
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
        beta = torch.sigmoid(b)  # (B, T, H)
        if self.allow_neg_eigval:
            beta = 2 * beta  # (0, 2): I - beta k k^T can reflect (eigenvalue down to -1)
        S0 = None
        if state is not None:
            # clone when autograd may save it: the state is overwritten in place below
            S0 = state['S'].clone() if torch.is_grad_enabled() else state['S']

        if fla and T > 1:
            # training / prefill: fla's chunked kernel. Under autocast q, k, v are already bf16;
            # a plain fp32 model feeds it bf16 too (the kernel has no fp32 mode).
            kdt = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else v.dtype
            kdt = kdt if kdt in (torch.bfloat16, torch.float16) else torch.bfloat16
            o, S = delta_rule_fla(q, k, v, beta, self.scale, S0, output_final_state=state is not None,
                                  kernel_dtype=kdt)
        else:
            # PyTorch path (CPU, backend='torch', and every T == 1 decoding step): exact, in fp32
            # (fp64 for an fp64 model), autocast off so the matmuls are not done in bf16.
            cdt = torch.promote_types(v.dtype, torch.float32)
            with torch.autocast(x.device.type, enabled=False):
                qf, kf = l2norm(q.to(cdt)), l2norm(k.to(cdt))
                if T == 1:
                    o, S = delta_rule_recurrent_ref(qf, kf, v.to(cdt), beta.to(cdt), self.scale, S0)
                else:
                    o, S = delta_rule_chunk_ref(qf, kf, v.to(cdt), beta.to(cdt), self.scale, S0, self.chunk_size)
        if state is not None:
            state['S'].copy_(S)

        y = self.o_norm(o).to(v.dtype).reshape(B, T, H * D)  # (B, T, H*Dv)
        return self.resid_dropout(self.c_proj(y))

    def init_state(self, batch_size, max_len, device, dtype):
        # the recurrent state is fp32 (fp64 for an fp64 model) whatever the activations' dtype;
        # the conv cache (the q, k, v convs' last inputs) holds activations. max_len is irrelevant: the
        # state has a fixed size.
        H, D = self.n_head, self.head_dim
        return {'S': torch.zeros(batch_size, H, D, D, device=device, dtype=torch.promote_types(dtype, torch.float32)),
                'conv': fused_conv_cache(self._convs, batch_size, device, dtype)}

    def flops_per_token(self, T):
        """Forward FLOPs per token of the chunked delta rule (what training runs), per head, with
        c = min(chunk_size, T), Dk = Dv = D, and matmuls counted over full squares like attention's:
            K K^T for the UT matrix, W = T (beta K), U' = T (beta V)    2cD + 2cD + 2cD
            Q K^T and tril(Q K^T) U                                    2cD + 2cD
            W S0, Q S0, K^T U (the state reads and write)              6 D^2
            inverting the unit-triangular (I + L) of a chunk           ~c^2 / 3   (c^3/3 per chunk)
        The token-by-token recurrence would be 6 D^2 (two reads and a rank-1 write of S).
        Elementwise work (conv, norms, gates) is left out, as for attention. tests/test_flops.py checks
        this against torch's FLOP counter on the chunked reference."""
        c = min(self.chunk_size, T)
        D = self.head_dim
        return self.n_head * (10 * c * D + 6 * D * D + c * c // 3)


# ----------------------------------------------------------------------------- GPT

@dataclass
class GPTConfig(model.BaseConfig):
    model_type: str = setting('delta', "the token mixer: DeltaNet")
    pos_emb: str = setting('none', "'none': the short convs and the recurrence carry position information")
    d_ff: int = setting(-1, D_FF_HELP)
    n_head: int = setting(6, "delta-rule heads")
    head_dim: int = setting(64, "key and value head dim (n_head * head_dim need not equal n_embd)")
    conv_size: int = setting(4, "kernel of the causal depthwise convs on q, k, v")
    chunk_size: int = setting(64, "chunk length of the PyTorch chunked reference (fla's kernel uses 64)")
    allow_neg_eigval: bool = setting(False, "beta in (0, 2) instead of (0, 1): transitions can have eigenvalue -1")
    backend: str = setting('auto', "'auto': fla kernels on CUDA, torch reference elsewhere; 'fla' (CUDA only); 'torch'")


class GPT(model.GPT):
    mixer_cls = DeltaNetMixer


TINY = dict(n_layer=2, n_embd=64, n_head=2, head_dim=32, block_size=64)


# ----------------------------------------------------------------------------- self-check

rel_rms = model.rel_rms


def compare_chunk_kernel(B=2, T=1000, H=4, D=64, l2norm_in_kernel=True, dtype=torch.bfloat16, seed=0, device='cuda',
                         neg_eigval=False):
    """fla's chunk_delta_rule (inputs in `dtype`) against delta_rule_chunk_ref in fp32 on the same
    inputs, with an initial state and a loss on both the output and the final state.
    l2norm_in_kernel: raw q, k with use_qk_l2norm_in_kernel=True (what the model does) against the
    reference on l2norm(q), l2norm(k); else both get pre-normalised q, k. neg_eigval: beta in (0, 2)
    (2 * sigmoid, as allow_neg_eigval makes it) instead of (0, 1).
    Returns {name: rel RMS} for o, final state, dq, dk, dv, dbeta, dh0."""
    chunk_delta_rule = fla_ops.import_fla('fla.ops.delta_rule', 'chunk_delta_rule')
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)
    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    if not l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    beta = (torch.sigmoid(rnd(B, T, H)) * (2 if neg_eigval else 1)).to(dtype)
    h0 = rnd(B, H, D, D)
    do, dS = rnd(B, T, H, D), rnd(B, H, D, D)
    scale = D ** -0.5

    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, beta, h0)]
    o, S = chunk_delta_rule(*ins[:4], scale=scale, initial_state=ins[4], output_final_state=True,
                            use_qk_l2norm_in_kernel=l2norm_in_kernel)
    ((o.float() * do).sum() + (S.float() * dS).sum()).backward()
    got = [o, S] + [t.grad for t in ins]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        ref_ins = [t.detach().float().requires_grad_() for t in (q, k, v, beta, h0)]
        qr, kr = (l2norm(ref_ins[0]), l2norm(ref_ins[1])) if l2norm_in_kernel else ref_ins[:2]
        o_r, S_r = delta_rule_chunk_ref(qr, kr, ref_ins[2], ref_ins[3], scale, ref_ins[4])
        ((o_r * do).sum() + (S_r * dS).sum()).backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    want = [o_r, S_r] + [t.grad for t in ref_ins]
    names = ['o', 'final_state', 'dq', 'dk', 'dv', 'dbeta', 'dh0']
    return {n: rel_rms(a, b) for n, a, b in zip(names, got, want)}


def selfcheck(device='cuda', tol=1e-2):
    """Compare the one fla kernel this model uses, chunk_delta_rule (bf16), with the fp32 chunked
    reference: outputs and gradients, with and without its in-kernel q/k L2 norm, and with beta in (0, 2)
    (allow_neg_eigval)."""
    results = []
    for l2, neg in ((True, False), (False, False), (True, True)):
        errs = compare_chunk_kernel(B=2, T=1000, H=4, D=64, l2norm_in_kernel=l2, device=device, neg_eigval=neg)
        worst = max(errs, key=errs.get)
        results.append(dict(name=f"chunk_delta_rule(bf16, use_qk_l2norm_in_kernel={l2}"
                                 + (", beta in (0, 2)" if neg else "") + ") vs fp32 ref",
                            ok=errs[worst] < tol, max_rel_rms=errs[worst],
                            detail=f"B=2 T=1000 H=4 D=64; worst {worst}; " +
                                   ', '.join(f"{n}={e:.2e}" for n, e in errs.items())))
    return results


if __name__ == '__main__':
    for r in selfcheck():
        print(('OK  ' if r['ok'] else 'FAIL'), r['name'], f"max_rel_rms={r['max_rel_rms']:.2e}", r['detail'])
