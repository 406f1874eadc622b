"""
Gated DeltaProduct (Siems et al., 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
Householder Products"): the GPT skeleton of model.py with a token mixer whose fixed-size state takes
n_h generalized Householder steps per token, after a Mamba2-style forget gate.

The recurrence, per head (state S_t of shape (Dk, Dv), so the readout is S_t^T q; the paper writes
the transpose, S of shape (Dv, Dk) with readout S q):

    S <- alpha_t * S_{t-1}                                   alpha_t = exp(g_t), g_t <= 0 (log space)
    for j = 1..n_h:  S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T
    o_t = scale * S^T q_t                                    (read once, after the n_h steps)

i.e. the state transition of one token is alpha_t * prod_j (I - beta_tj k_tj k_tj^T), a product of
n_h generalized Householder matrices, whose eigenvalues stay in [-1, 1] when beta in (0, 2)
(allow_neg_eigval) and in [0, 1] when beta in (0, 1). Equivalently: the gated delta rule run over the
interleaved sequence of T * n_h sub-steps, with the gate on each token's first sub-step only and the
output read at each token's last sub-step. That is what fla's chunk_gated_delta_product computes
(see fla/ops/gated_delta_product/naive.py: decay first, then the n_h updates, then the readout), and
what the two references below compute from the math:

    naive_recurrent_gated_delta_product   token by token (the oracle; also the T == 1 decode step)
    chunk_gated_delta_product_ref         chunked WY/UT form over the interleaved sequence

The layer follows fla's GatedDeltaProduct layer (fla/layers/gated_deltaproduct.py): q, k, v
projections each through a causal depthwise conv (kernel 4) + SiLU, q and k L2-normalised per head
(inside the kernel), scale Dk^-0.5; beta = sigmoid(b_proj(x)) (x2 with allow_neg_eigval); forget gate
g = -exp(A_log) * softplus(a_proj(x) + dt_bias); output o = RMSNorm_per_head(o) * SiLU(g_proj(x)),
then c_proj. Unlike fla's layer defaults (head_dim 256, expand_v 2, which ignore the model width), the
widths come from this config: n_head heads of head_dim keys and head_dim * expand_v values.

Kernels: on CUDA, fla's chunk_gated_delta_product (training and prefill, with the decoding state as
initial/final state); a torch recurrent step for T == 1 decoding. Elsewhere, the torch references.
fla is imported lazily, only on the CUDA path.

Hopper + Triton >= 3.4.0 and < 3.7.1 (e.g. the H200 image's Triton 3.6): fla refuses the backward of
the *gated* chunk kernels (its Triton chunk_bwd_dqkwg gives wrong results there) unless its TileLang
backend is usable: the `tilelang` package importable, an `nvcc` findable (CUDA_HOME / CUDA_PATH, PATH,
the nvidia-cuda-nvcc wheel, /usr/local/cuda), FLA_TILELANG not set to 0 (it defaults to on on Hopper
with Triton >= 3.4) and FLA_DISABLE_BACKEND_DISPATCH not set to 1 (fla/backends.py,
fla/ops/common/backends/tilelang). This mixer checks that up front and raises a clear error naming
the fixes rather than failing later inside loss.backward().
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import fla_ops
import model
from model import D_FF_HELP, setting
from model_delta import ShortConv, fused_conv_cache, fused_linear, fused_short_conv, l2norm  # l2norm: fla's q/k norm formula



# ----------------------------------------------------------------------------- references (pure torch)

def _compute_dtype(*ts):
    """float64 when any input is float64 (tests), else float32 (states and gates stay fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def gated_delta_product_step(S, q, k, v, g, beta, scale):
    """One token of the recurrence. S (B, H, Dk, Dv); q (B, H, Dk); k (B, n, H, Dk); v (B, n, H, Dv);
    g (B, H) log forget gate or None; beta (B, n, H). Returns o (B, H, Dv) and the new S (out of
    place, so autograd can go through it). Everything in S's dtype."""
    dt = S.dtype
    with torch.autocast(S.device.type, enabled=False):  # fp32 state math even under autocast
        if g is not None:
            S = S * g.to(dt).exp()[..., None, None]             # forget first: S <- alpha_t S
        for j in range(k.size(1)):                              # the n_h Householder steps
            kj, vj, bj = k[:, j].to(dt), v[:, j].to(dt), beta[:, j].to(dt)
            # (I - b k k^T) S + b k v^T  ==  S + b k (v - S^T k)^T
            err = vj - torch.einsum('bhkv,bhk->bhv', S, kj)     # (B, H, Dv): v minus what S recalls for k
            S = S + bj[..., None, None] * kj[..., :, None] * err[..., None, :]
        o = scale * torch.einsum('bhkv,bhk->bhv', S, q.to(dt))  # readout after all n_h steps
    return o, S


def naive_recurrent_gated_delta_product(q, k, v, g, beta, scale=None, initial_state=None, num_householder=1):
    """Token-by-token oracle. q (B, T, H, Dk); k (B, T*n, H, Dk) and v (B, T*n, H, Dv) with sub-step
    t*n + j holding token t's j-th key/value (fla's layout); g (B, T, H) or None; beta (B, T*n, H);
    initial_state (B, H, Dk, Dv) or None. q and k are used as given (normalise them before).
    Returns o (B, T, H, Dv) and the final state (B, H, Dk, Dv), in fp32 (fp64 for fp64 inputs)."""
    B, T, H, Dk = q.shape
    n, Dv = num_householder, v.shape[-1]
    _check_shapes(q, k, v, g, beta, initial_state, n)
    scale = Dk ** -0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    S = q.new_zeros(B, H, Dk, Dv, dtype=dt) if initial_state is None else initial_state.to(dt)
    k, v, beta = k.view(B, T, n, H, Dk), v.view(B, T, n, H, Dv), beta.view(B, T, n, H)
    outs = []
    for t in range(T):
        o, S = gated_delta_product_step(S, q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], beta[:, t], scale)
        outs.append(o)
    return torch.stack(outs, dim=1), S


def chunk_gated_delta_product_ref(q, k, v, g, beta, scale=None, initial_state=None, num_householder=1,
                                  chunk_size=32):
    """The same function as naive_recurrent_gated_delta_product (same arguments), in chunked form:
    the gated delta rule over the interleaved sequence of L = T*n sub-steps, chunks of `chunk_size`
    sub-steps, a sequential loop over chunks only. 32, not fla's 64: the per-chunk (C, C) work halves
    while the loop stays short, and the CPU preset's model trains and evaluates 1.12x faster for it
    (farm-bench, 5 paired runs; 16 was 1.10x slower than 32).

    Within a chunk (sub-steps r = 1..C, state S0 at its start, gamma_r = cumulative log gate, G_r =
    exp(gamma_r)), writing the update as S_r = e^{g_r} S_{r-1} + k_r d_r^T gives
        S_r = G_r S0 + sum_{i<=r} (G_r/G_i) k_i d_i^T,
        d_r = b_r (v_r - e^{g_r} S_{r-1}^T k_r)
            = b_r (v_r - G_r S0^T k_r - sum_{i<r} (G_r/G_i) (k_r.k_i) d_i),
    so (I + A) d = diag(b) V - diag(b G) K S0 with A strictly lower, A_ri = b_r (G_r/G_i) k_r.k_i.
    With the UT transform T = (I + A)^-1: d = U - W S0, U = T diag(b) V, W = T diag(b G) K (both
    independent of S0, so batched over all chunks), then per chunk
        o_r   = scale * (G_r S0^T q_r + sum_{i<=r} (G_r/G_i) (q_r.k_i) d_i)
        S_end = G_C S0 + sum_i (G_C/G_i) k_i d_i^T.
    Padding sub-steps (k = v = b = g = 0) are identities, so any T works."""
    with torch.autocast(q.device.type, enabled=False):  # fp32 math even under autocast
        return _chunk_ref(q, k, v, g, beta, scale, initial_state, num_householder, chunk_size)


def _chunk_ref(q, k, v, g, beta, scale, initial_state, num_householder, chunk_size):
    """chunk_gated_delta_product_ref's body (autocast off around it)."""
    B, T, H, Dk = q.shape
    n, Dv = num_householder, v.shape[-1]
    _check_shapes(q, k, v, g, beta, initial_state, n)
    scale = Dk ** -0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    L, C = T * n, chunk_size
    # interleave: the query sits on each token's last sub-step, the gate on its first one
    qi = F.pad(q.to(dt)[:, :, None], (0, 0, 0, 0, n - 1, 0)).reshape(B, L, H, Dk)
    gi = (torch.zeros(B, L, H, dtype=dt, device=q.device) if g is None
          else F.pad(g.to(dt)[:, :, None], (0, 0, 0, n - 1)).reshape(B, L, H))
    Lp = -(-L // C) * C  # pad to whole chunks with identity sub-steps
    N = Lp // C

    def chunks(x):  # (B, L, H, ...) -> (B, H, N, C, ...)
        x = x.to(dt)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, Lp - L))
        return x.reshape(B, N, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    qc, kc, vc, bc, gc = chunks(qi), chunks(k), chunks(v), chunks(beta), chunks(gi)  # (B, H, N, C[, D])
    gam = gc.cumsum(-1)                                             # (B, H, N, C) log G_r
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # G_r / G_i for i <= r (else 0): exp of a difference that is <= 0 there; -inf elsewhere, not a
    # masked exp of something possibly huge, so no inf * 0 = nan in the forward or the backward
    decay = torch.where(causal, gam[..., :, None] - gam[..., None, :], float('-inf')).exp()  # (B, H, N, C, C)
    A = (bc[..., :, None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
    U = torch.linalg.solve_triangular(A, bc[..., None] * vc, upper=False, unitriangular=True)  # (I+A)^-1 diag(b) V
    W = torch.linalg.solve_triangular(A, (bc * gam.exp())[..., None] * kc, upper=False, unitriangular=True)
    QK = (qc @ kc.transpose(-1, -2)) * decay                        # (B, H, N, C, C) gated q_r.k_i, i <= r
    to_end = (gam[..., -1:] - gam).exp()                            # (B, H, N, C) G_C / G_i

    S = q.new_zeros(B, H, Dk, Dv, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for c in range(N):
        d = U[:, :, c] - W[:, :, c] @ S                             # (B, H, C, Dv)
        outs.append(gam[:, :, c].exp()[..., None] * (qc[:, :, c] @ S) + QK[:, :, c] @ d)
        S = gam[:, :, c, -1].exp()[..., None, None] * S + (kc[:, :, c] * to_end[:, :, c, :, None]).transpose(-1, -2) @ d
    o = scale * torch.stack(outs, dim=2).reshape(B, H, Lp, Dv)[:, :, :L]  # (B, H, L, Dv)
    o = o.transpose(1, 2).reshape(B, T, n, H, Dv)[:, :, -1]        # read at each token's last sub-step
    return o, S


def _check_shapes(q, k, v, g, beta, initial_state, n):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    want = {'k': (k, (B, T * n, H, Dk)), 'v': (v, (B, T * n, H, Dv)), 'beta': (beta, (B, T * n, H)),
            'g': (g, (B, T, H)), 'initial_state': (initial_state, (B, H, Dk, Dv))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(q {tuple(q.shape)}, num_householder {n})")


# ----------------------------------------------------------------------------- fla (CUDA) path

def fla_gated_delta_product(q, k, v, g, beta, scale, initial_state=None, output_final_state=False, num_householder=1):
    """fla's chunk kernel, with q/k l2-normalised inside it, through its custom op (fla_ops.py), which
    torch.compile traces without a graph break. q, k, v, beta are cast to a 16-bit dtype (fla's chunk
    kernels reject fp32: bf16 unless they are already fp16/bf16); g and the states fp32."""
    kd = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state))
    if needs_grad and g is not None and not torch.compiler.is_compiling():  # compiled: the backward op checks
        problem = fla_ops.gated_backward_problem()
        if problem:
            raise RuntimeError(problem)
    return fla_ops.chunk_gated_delta_product(
        q.to(kd), k.to(kd), v.to(kd), None if g is None else g.float(), beta.to(kd), scale, num_householder,
        None if initial_state is None else initial_state.float(), output_final_state)


# ----------------------------------------------------------------------------- the mixer

class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's values (weight shared by the heads), times SiLU(gate); in fp32 (or fp64)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate):
        dt = _compute_dtype(x, gate)
        x = F.rms_norm(x.to(dt), (x.size(-1),), self.weight.to(dt), self.eps)
        return x * F.silu(gate.to(dt))


class GatedDeltaProductMixer(nn.Module):
    # a one-token step reads and writes fixed-size buffers (state, conv cache) and ignores pos: it can be
    # captured in a CUDA graph as it is (model.GraphedDecodeStep)
    static_decode = True

    def __init__(self, config, layer_idx=0):
        super().__init__()
        model.check_backend(config.backend)
        if not (isinstance(config.num_householder, int) and config.num_householder >= 1):
            raise ValueError(f"num_householder must be an int >= 1, got {config.num_householder!r}")
        if config.conv_size < 2:
            raise ValueError(f"conv_size must be >= 2 (a causal conv with a decoding cache), got {config.conv_size}")
        head_v_dim = config.head_dim * config.expand_v
        if head_v_dim != int(head_v_dim) or head_v_dim < 1:
            raise ValueError(f"head_dim * expand_v must be a positive integer, got "
                             f"{config.head_dim} * {config.expand_v} = {head_v_dim}")
        self.backend = config.backend
        self.n_head = H = config.n_head
        self.head_k_dim = Dk = config.head_dim
        self.head_v_dim = Dv = int(head_v_dim)
        self.num_householder = n = config.num_householder
        self.allow_neg_eigval = config.allow_neg_eigval
        self.scale = Dk ** -0.5
        C, bias = config.n_embd, config.bias

        self.q_proj = nn.Linear(C, H * Dk, bias=bias)
        self.k_proj = nn.Linear(C, n * H * Dk, bias=bias)     # n_h keys per token
        self.v_proj = nn.Linear(C, n * H * Dv, bias=bias)     # n_h values per token
        self.b_proj = nn.Linear(C, n * H, bias=bias)          # n_h betas per token and head
        self.a_proj = nn.Linear(C, H, bias=False)             # forget gate input (dt_bias is its bias)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.q_conv = ShortConv(H * Dk, config.conv_size)
        self.k_conv = ShortConv(n * H * Dk, config.conv_size)
        self.v_conv = ShortConv(n * H * Dv, config.conv_size)
        self.g_proj = nn.Linear(C, H * Dv, bias=bias)         # output gate
        self.o_norm = GatedRMSNorm(Dv)
        self.c_proj = nn.Linear(H * Dv, C, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.post_init()  # so a mixer built on its own is initialised too; GPT runs it again

    @torch.no_grad()
    def post_init(self):
        """Mamba2's forget-gate init (as in fla's layer): decay rates A ~ U[1, 16] stored as log A; time
        steps dt log-uniform in [1e-3, 1e-1] (floored at 1e-4), stored through softplus's inverse so
        that softplus(dt_bias) = dt at a_proj(x) = 0. The per-token forget rate is exp(-A * dt).
        (fla's layer draws A from U[0, 16], which can in principle give log 0 = -inf.)"""
        H, dev = self.n_head, self.A_log.device
        self.A_log.copy_(torch.empty(H, device=dev).uniform_(1, 16).log())
        dt_min, dt_max = 1e-3, 1e-1
        dt = torch.exp(torch.rand(H, device=dev) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    @property
    def _in_projs(self):  # g_proj last: forward() projects it apart past one token (self._in_projs[:-1])
        return [self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.a_proj, self.g_proj]

    @property
    def _convs(self):
        return [self.q_conv, self.k_conv, self.v_conv]

    def _use_fla(self, x):
        if not model.use_fla(self.backend, x):
            return False
        try:
            import fla.ops.gated_delta_product  # noqa: F401
        except (ImportError, OSError) as e:  # OSError: e.g. a tilelang install missing libz3 (fla.ops imports it)
            raise RuntimeError(f"backend {self.backend!r} on CUDA needs flash-linear-attention "
                               f"(`pip install fla-core`; a tilelang it finds must import too, with z3-solver): "
                               f"{type(e).__name__}: {e}; or use backend='torch'") from e
        return True

    def forward(self, x, state=None, pos=0):
        B, T, C = x.size()
        H, Dk, Dv, n = self.n_head, self.head_k_dim, self.head_v_dim, self.num_householder
        if state is not None and state['S'].size(0) != B:
            raise ValueError(f"state is for batch size {state['S'].size(0)}, input has {B}")
        conv_cache = state['conv'] if state is not None else None
        # the projections of x as one matmul (fused_linear), then short causal convs (+ SiLU) on q, k, v,
        # as fla's layer does, as one conv: fla's conv kernel where no cache is kept (training). Past one
        # token the output gate's projection is its own matmul: fused, its gradient (the gated norm's
        # backward) joins the others' in one cat that Inductor (torch 2.11) lowers as a pointwise kernel
        # evaluating every branch for every column, 2.05 of the step's 15.7 ms of kernels at B 64 x T 256
        # (results/training-speedups/kernel-profile/). Apart, the step takes 14.70 ms against 16.32 on the
        # H200 (results/training-speedups/gate-apart-and-nsa-compiled/)
        split = [H * Dk + n * H * (Dk + Dv), n * H, H]
        if T == 1:
            qkv, b, a, gate = fused_linear(x, self._in_projs).split(split + [H * Dv], -1)
        else:
            (qkv, b, a), gate = fused_linear(x, self._in_projs[:-1]).split(split, -1), self.g_proj(x)
        fla_conv = state is None and self._use_fla(x)
        q, k, v = fused_short_conv(qkv, self._convs, conv_cache, fla_conv).split(
            [H * Dk, n * H * Dk, n * H * Dv], dim=-1)
        q = q.reshape(B, T, H, Dk)
        k = k.reshape(B, T * n, H, Dk)  # (t n h d) -> (t n) h d
        v = v.reshape(B, T * n, H, Dv)
        cdt = _compute_dtype(x)  # gates, states and the norm in fp32 (fp64 for an fp64 model)
        beta = b.to(cdt).sigmoid().reshape(B, T * n, H)
        if self.allow_neg_eigval:
            beta = 2 * beta  # (0, 2): I - beta k k^T can then reflect (eigenvalue down to -1)
        # log forget gate, fp32: g = -A * dt, dt = softplus(a_proj(x) + dt_bias)
        g = -self.A_log.to(cdt).exp() * F.softplus(a.to(cdt) + self.dt_bias.to(cdt))  # (B, T, H)
        gate = gate.reshape(B, T, H, Dv)
        # a copy when autograd may save it: the state is overwritten in place below
        S0 = None if state is None else (state['S'].clone() if torch.is_grad_enabled() else state['S'])

        # autocast off: the torch recurrences and the norm must stay in fp32 (autocast would run their
        # matmuls in bf16); the fla kernel gets its dtypes explicitly
        with torch.autocast(x.device.type, enabled=False):
            if state is not None and T == 1:
                # decoding step: the recurrence itself on the fp32 state
                o, S = gated_delta_product_step(S0, l2norm(q[:, 0].to(S0.dtype)), l2norm(k.to(S0.dtype)), v,
                                                g[:, 0], beta, self.scale)
                o = o[:, None]
            elif self._use_fla(x):
                o, S = fla_gated_delta_product(q, k, v, g, beta, self.scale, initial_state=S0,
                                               output_final_state=state is not None, num_householder=n)
            else:
                o, S = chunk_gated_delta_product_ref(l2norm(q.to(cdt)), l2norm(k.to(cdt)), v, g, beta, self.scale,
                                                     initial_state=S0, num_householder=n)
            if state is not None:
                state['S'].copy_(S)
            o = self.o_norm(o, gate)  # (B, T, H, Dv), fp32
        y = self.c_proj(o.reshape(B, T, H * Dv).to(x.dtype))
        return self.resid_dropout(y)

    def init_state(self, batch_size, max_len, device, dtype):
        """Recurrent state S (fp32, or fp64 for an fp64 model; independent of max_len) and the q/k/v convs'
        one cache (activations' dtype)."""
        H, Dk, Dv = self.n_head, self.head_k_dim, self.head_v_dim
        s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return {'S': torch.zeros(batch_size, H, Dk, Dv, device=device, dtype=s_dtype),
                'conv': fused_conv_cache(self._convs, batch_size, device, dtype)}

    def flops_per_token(self, T, chunk_size=64):
        """Forward FLOPs per token beyond the parameters' 2N: what fla's chunked kernel runs, a multiply-add
        = 2 FLOPs, intra-chunk squares counted in full (like vanilla's T x T). The WY part works on the
        interleaved sequence of n_h sub-steps per token, in chunks of c = min(64, T*n_h) sub-steps; the
        output part on chunks of ct = min(64, T) tokens, each token's query against the n_h keys of every
        token of its chunk (fla/ops/gated_delta_product/chunk_deltaproduct_o.py). Per head:
          per sub-step: K K^T row 2cDk; (I+A)^-1, inverted explicitly (solve_tril) ~c^2/3; W and U rows
                        by matmul with it 2c(Dk+Dv); d = U - W S 2DkDv; state update K^T d 2DkDv
          per token:    intra-chunk q.k and (qk)d, n_h keys per token 2 n_h ct (Dk+Dv); S^T q 2DkDv.
        Roughly linear in T once T >= 64 (a recurrent model: no growing attention). The conv,
        gates and norms are O(width) and left out, like vanilla's softmax. tests/test_flops.py checks
        this against torch's FLOP counter on the reference."""
        H, Dk, Dv, n = self.n_head, self.head_k_dim, self.head_v_dim, self.num_householder
        c, ct = min(chunk_size, T * n), min(chunk_size, T)
        per_sub = 2 * c * Dk + c * c // 3 + 2 * c * (Dk + Dv) + 4 * Dk * Dv
        per_tok = 2 * n * ct * (Dk + Dv) + 2 * Dk * Dv
        return H * (n * per_sub + per_tok)


# ----------------------------------------------------------------------------- the model

@dataclass
class GPTConfig(model.BaseConfig):
    model_type: str = setting('delta_product', "the token mixer: Gated DeltaProduct")
    pos_emb: str = setting('none', "'none': the convs and the recurrence carry position")
    d_ff: int = setting(-1, D_FF_HELP)
    head_dim: int = setting(64, "key (and query) dim per head; n_head heads (fla's 256 ignores n_embd)")
    expand_v: float = setting(1.0, "value head dim = head_dim * expand_v")
    num_householder: int = setting(2, "n_h: Householder steps (keys/values/betas) per token")
    allow_neg_eigval: bool = setting(False, "beta in (0, 2) instead of (0, 1): transitions can have eigenvalue -1")
    conv_size: int = setting(4, "kernel of the short causal convs on q, k, v")
    backend: str = setting('auto', "'auto': fla kernels on CUDA, torch reference elsewhere; 'fla' (CUDA only); 'torch'")


class GPT(model.GPT):
    mixer_cls = GatedDeltaProductMixer


TINY = dict(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=64, num_householder=2)


# ----------------------------------------------------------------------------- self-check on the GPU

def selfcheck(device='cuda', T=300, tol=0.02):
    """fla's chunk_gated_delta_product (bf16, q/k l2norm in the kernel, as the mixer calls it) against
    chunk_gated_delta_product_ref (fp32, on the same bf16-rounded inputs): output, final state, and the
    gradients of q, k, v, g, beta and the initial state. T is not a multiple of the chunk size."""
    torch.manual_seed(0)
    B, H, Dk, Dv, n = 2, 4, 64, 64, 2
    dev = torch.device(device)
    bf = torch.bfloat16
    q = torch.randn(B, T, H, Dk, device=dev).to(bf)
    k = torch.randn(B, T * n, H, Dk, device=dev).to(bf)
    v = torch.randn(B, T * n, H, Dv, device=dev).to(bf)
    beta = torch.rand(B, T * n, H, device=dev).mul(2).to(bf)        # (0, 2): negative eigenvalues too
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 2)          # fp32, mild decay
    h0 = torch.randn(B, H, Dk, Dv, device=dev) * 0.1
    do = torch.randn(B, T, H, Dv, device=dev)
    dht = torch.randn(B, H, Dk, Dv, device=dev)
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0)
    results = {}
    for name in ('fla', 'ref'):
        leaf = {key: t.detach().clone().requires_grad_() for key, t in inputs.items()}
        if name == 'fla':
            o, ht = fla_gated_delta_product(leaf['q'], leaf['k'], leaf['v'], leaf['g'], leaf['beta'], Dk ** -0.5,
                                            initial_state=leaf['h0'], output_final_state=True, num_householder=n)
        else:
            o, ht = chunk_gated_delta_product_ref(l2norm(leaf['q'].float()), l2norm(leaf['k'].float()),
                                                  leaf['v'].float(), leaf['g'], leaf['beta'].float(), Dk ** -0.5,
                                                  initial_state=leaf['h0'], num_householder=n)
        ((o.float() * do).sum() + (ht * dht).sum()).backward()
        results[name] = dict(o=o.detach(), final_state=ht.detach(),
                             **{f'd{key}': t.grad for key, t in leaf.items()})
    out = []
    for key in results['ref']:
        err = model.rel_rms(results['fla'][key], results['ref'][key])
        out.append(dict(name=f'chunk_gated_delta_product {key}', ok=bool(err < tol), max_rel_rms=err,
                        detail=f'bf16 kernel vs fp32 ref, B={B} T={T} H={H} Dk={Dk} Dv={Dv} n_h={n}'))
    return out


if __name__ == '__main__':
    for r in selfcheck():
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']:45s} rel_rms={r['max_rel_rms']:.2e}  {r['detail']}")
