"""
NSA, Native Sparse Attention (Yuan et al., 2025): the GPT skeleton of model.py with a token mixer
that mixes three attention branches over the same GQA keys/values.

For every query token t and query head h (keys k and queries q carry RoPE at their absolute
positions, so a decoding step at position p rotates by angle p):

    compression  attend to one summary per *complete* block of nsa_block_size tokens: the mean of the
                 block's keys and values. Block c (tokens c*bs .. c*bs+bs-1) is visible iff its last
                 token is at or before t: (c+1)*bs - 1 <= t. No complete block yet -> output 0.
    selection    full-resolution attention over nsa_block_counts blocks of the raw tokens (causal
                 inside the blocks). The blocks are chosen per query and per KV head from the
                 compression probabilities p_cmp(t, h, c), summed over the GQA group of query heads
                 sharing that KV head (so the group reads the same blocks). Block 0, the query's own
                 block t // bs and the one before it are always chosen; the rest are the top scorers
                 among the earlier blocks; unused slots stay empty (-1).
    window       plain causal attention over the last nsa_window_size tokens: keys t-w+1 .. t.

    o = sigmoid(g_cmp) * o_cmp + sigmoid(g_slc) * o_slc + sigmoid(g_swa) * o_swa,

three gates per head per token from Linear(C -> 3 * n_head), then c_proj. All branches share the
scale 1/sqrt(head_dim). Compression by mean pooling (not the paper's learned MLP) and the forced
blocks are what fla's parallel_nsa computes; it is the function of this file (see "fla semantics").

What each branch covers, with the defaults (nsa_block_size=32, nsa_block_counts=4, nsa_window_size=64):
    T = 256 (training context): compression sees the complete 32-token blocks up to the query, at
      most 8 summaries (all 256 tokens, for the last query). Selection reads 4 blocks = 128 of the
      256 tokens: block 0, the current and previous blocks, and one more chosen block (from t >= 96,
      before that there are at most 3 blocks). The window reads the last 64 tokens, which overlap the
      current and previous blocks (those cover the last 33..64 tokens).
    T = 65536: compression reads 2048 summaries, selection 128 tokens (block 0, the 2 recent blocks,
      1 chosen of the other 2045), the window 64: about 2240 keys per query instead of 65536.

Backends: 'auto' runs fla's Triton kernels on CUDA (parallel_nsa's compression + top-k +
selection; the window by flash-attn if importable, else fla's parallel_attn; all as custom ops,
fla_ops.parallel_nsa) and the PyTorch reference elsewhere; 'fla' insists on the kernels; 'torch' always runs the reference. Decoding
(every T == 1 step and any continuation at pos > 0) is PyTorch on every device, on a KV cache plus a
cache of compressed blocks, never recomputing the prefix.

fla semantics (fla-core 0.6.0, fla/ops/nsa/*.py; what the reference below reproduces):
    * GQA group G = n_head / n_kv_head must be a power of two >= 16 (parallel.py:904); query heads
      h*G .. h*G+G-1 share KV head h (parallel.py:82, o_g = i_h * G + arange(G)).
    * compressed k/v: mean_pooling(k, block_size) over each block of raw (post-RoPE) keys, accumulated in
      fp32 and stored in k's dtype (parallel.py:913, utils/pooling.py:64).
    * compression branch: block c visible iff (c+1)*bs - 1 <= t (compression.py:81, NC = (t+1)//BS);
      no visible block -> output 0 and lse 0 (compression.py:116-120).
    * top-k (parallel.py:130-170): importance of block c < t//bs is exp(s_c - lse_cmp), i.e. the
      compression branch's own softmax probability, summed over the G heads of the group (parallel.py:150);
      blocks 0, IC-1 and IC (IC = t//bs) get probability 1 per head, i.e. the maximum; blocks > IC
      are padding with index -1. Ranked by a bitonic sort, the first S kept.
    * S = next_power_of_2(block_counts) slots are produced and, for an int block_counts, all S are
      attended (parallel.py:566 and NS = S at :239) -> block_counts must be a power of two here.
      block_size >= 2 * S (parallel.py:570), block_size a power of two >= 16 and head_dim in 16..256
      (Triton tile shapes; tl.dot needs dims >= 16).
    * selection: a slot with index < 0 or starting after t is skipped; inside a block keys > t are
      masked (parallel.py:262-274). No gradient flows through the choice of blocks.
    * ties: among equal scores the bitonic network picks by position, not by index. With
      block_counts >= 3 the (at most 3) forced blocks always fit, and other ties need exactly equal
      fp32 sums of probabilities; with block_counts < 3 the kernel drops forced blocks in a
      position-dependent way (e.g. S=2: {1,2} at IC=2, {2,3} at IC=3, {0,3} at IC=4), which no simple
      rule reproduces -> block_counts >= 3 (so >= 4) for the kernel backends.
    * window: parallel_nsa runs it only through flash_attn_func(causal, window_size=(w-1, 0)) and its
      default scale 1/sqrt(D) (parallel.py:943-960); keys t-w+1 .. t. parallel_attn(window_size=w)
      covers the same keys (ops/attn/parallel.py:806-808).
    * gates: o = o_slc * g_slc + o_cmp * g_cmp + o_swa * g_swa (parallel.py:938-960), gates given
      as they are (the sigmoid is the layer's).
Measured on an H200 (selfcheck, tests/test_nsa.py, tools/nsa_selection_probe.py): with the same block
indices, parallel_nsa in bf16 is within 3-4e-3 rel RMS of this reference in fp32 (output and every
gradient). On its full path it picks other blocks than the fp32 reference on ~0.3% of rows of random
inputs: each time a near-tie (fp32 importance gap <= 5e-6 * G) that bf16 rounding of q*scale and k_cmp
flips (the reference rule on bf16-rounded scores reproduces the kernel's choice on every row); such a
row's selected output changes wholesale, so the plain full-path error is ~2%. With block_counts=2 the
forced-block tie-break alone makes half the rows differ (~22% rel RMS at T=256, block 64).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import fla_ops
import model
from model import D_FF_HELP, setting



# ----------------------------------------------------------------------------- RoPE

rotary = model.rotary  # one RoPE for the repository: vanilla attention's pos_emb='rope' uses it too


# ----------------------------------------------------------------------------- reference (full sequence)

def masked_attention(q, k, v, mask, scale):
    """Softmax attention with an explicit mask, GQA on a grouped view of the queries.
    q (B, T, HQ, D); k, v (B, S, H, D); mask (B or 1, T, M, S), True = may attend, with M = HQ (one row
    per query head), H (one per KV head, shared by its G = HQ / H query heads) or 1 (all heads).
    Returns o (B, T, HQ, D) and the probabilities p (B, T, HQ, S); a row with nothing to attend
    gets p = 0 and o = 0 (instead of 0/0).
    Query head h uses KV head h // G. The scores are taken on q viewed as (B, T, H, G, D) against the H
    KV heads, and the mask broadcasts over the G axis, rather than K, V and the mask repeated G times:
    the same products and sums without the copies (the CPU preset's NSA has 16 query heads on 1 KV head;
    its one-seed run, results/cpu-reproduction, went from 5.0x vanilla's time to 2.4x)."""
    B, T, HQ, D = q.shape
    H = k.size(2)
    G = HQ // H
    M = mask.size(2)
    if M not in (HQ, H, 1):
        raise ValueError(f"mask has {M} heads; expected {HQ} (query heads), {H} (KV heads) or 1")
    mask = mask.reshape(mask.size(0), T, H, G, -1) if M == HQ and G > 1 else mask.unsqueeze(3)  # (., T, H|1, G|1, S)
    # masked scores pushed to the lowest finite value by an additive bias of the mask's (small) shape: their
    # exp is 0 all the same wherever a row has a key, a row with none gets a uniform softmax instead of 0/0
    # (zeroed by the multiply), and the backward of an add is the identity (a masked_fill's is another one)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    s = torch.einsum('bthgd,bshd->bthgs', q.reshape(B, T, H, G, D), k) * scale + bias  # (B, T, H, G, S)
    p = torch.softmax(s, dim=-1) * mask.any(-1, keepdim=True)
    o = torch.einsum('bthgs,bshd->bthgd', p, v)
    return o.reshape(B, T, HQ, v.size(-1)), p.reshape(B, T, HQ, -1)


def compress_kv(k, v, block_size):
    """Mean of the keys and values of each complete block: (B, T, H, D) -> (B, T // block_size, H, D).
    A trailing partial block is left out: no query can see it (it is visible only once complete)."""
    B, T, H, D = k.shape
    n = T // block_size
    pool = lambda x: x[:, :n * block_size].reshape(B, n, block_size, H, x.size(-1)).mean(2)
    return pool(k), pool(v)


def compressed_attention(q, k_cmp, v_cmp, block_size, scale, pos=0):
    """The compression branch: query t attends to compressed block c iff (c+1)*block_size - 1 <= t.
    q (B, T, HQ, D) at absolute positions pos .. pos+T-1; k_cmp, v_cmp (B, C, H, D).
    Returns o_cmp (B, T, HQ, D) (0 before the first block completes) and p_cmp (B, T, HQ, C)."""
    B, T, HQ, D = q.shape
    C = k_cmp.size(1)
    q_pos = torch.arange(T, device=q.device) + pos  # pos: an int or a 0-d tensor
    last_token = (torch.arange(C, device=q.device) + 1) * block_size - 1  # (C,)
    visible = last_token[None, :] <= q_pos[:, None]  # (T, C)
    return masked_attention(q, k_cmp, v_cmp, visible[None, :, None, :], scale)


def select_blocks(p_cmp, n_kv_head, block_size, block_counts, pos=0, n_blocks=None):
    """Top-k block selection from the compression probabilities.
    p_cmp (B, T, HQ, C): compression probabilities of the queries at absolute positions pos .. pos+T-1.
    n_blocks: how many blocks to rank (default: those that exist up to the last query; a static decoding
    step, whose pos is a tensor, ranks a fixed number and masks the ones that don't exist yet).
    Returns block_indices (B, T, n_kv_head, block_counts), long, -1 for empty slots.

    Per query t and KV head h: importance of block c = sum over the G query heads of group h of
    p_cmp(t, head, c) (one shared choice per group). Block 0, the current block t // bs and the
    previous one are forced (ranked first); blocks after the current one are not candidates. The
    rest are ranked by importance, ties by lower block index (stable sort)."""
    B, T, HQ, C = p_cmp.shape
    H = n_kv_head
    G = HQ // H
    cur = (torch.arange(T, device=p_cmp.device) + pos) // block_size  # (T,) the query's own block
    NB = (pos + T - 1) // block_size + 1 if n_blocks is None else n_blocks  # blocks up to the last query
    with torch.no_grad():  # the choice of blocks is discrete: no gradient flows through it
        importance = p_cmp.reshape(B, T, H, G, C).sum(3)  # (B, T, H, C)
        score = F.pad(importance, (0, NB - C))  # (B, T, H, NB): the partial last block scores 0
        c = torch.arange(NB, device=p_cmp.device)[None, :]
        forced = (c == 0) | (c == cur[:, None]) | (c == cur[:, None] - 1)  # (T, NB)
        candidate = c <= cur[:, None]  # (T, NB) causal: the query's own block at most
        score = score.masked_fill(forced[None, :, None, :], float('inf'))
        score = score.masked_fill(~candidate[None, :, None, :], float('-inf'))
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :block_counts]
        picked = torch.gather(score, -1, order) > float('-inf')
        idx = torch.where(picked, order, torch.full_like(order, -1))
        if idx.size(-1) < block_counts:  # fewer blocks in existence than slots
            idx = F.pad(idx, (0, block_counts - idx.size(-1)), value=-1)
    return idx


def selected_attention(q, k, v, block_indices, block_size, scale):
    """The selection branch: query t, through KV head h, attends to the tokens j <= t of the blocks in
    block_indices[b, t, h] (slots < 0 are empty). Each block should appear once per row (the kernel
    would count a repeated block twice). q (B, T, HQ, D); k, v (B, T, H, D); -> (B, T, HQ, D)."""
    T = q.size(1)
    j = torch.arange(T, device=q.device)
    key_block = j // block_size  # (T,) block of each key
    chosen = (block_indices.unsqueeze(-1) == key_block).any(-2)  # (B, T, H, T): key j's block chosen
    causal = j[None, :] <= j[:, None]  # (T, T)
    mask = chosen & causal[None, :, None, :]  # (B, T, H, T): one mask per KV head, shared by its query heads
    return masked_attention(q, k, v, mask, scale)[0]


def sliding_window_attention(q, k, v, window_size, scale):
    """The window branch: query t attends to keys t-window_size+1 .. t (flash-attn's
    window_size=(w-1, 0) with causal=True). q (B, T, HQ, D); k, v (B, T, H, D)."""
    T = q.size(1)
    j = torch.arange(T, device=q.device)
    mask = (j[None, :] <= j[:, None]) & (j[None, :] > j[:, None] - window_size)  # (T, T)
    return masked_attention(q, k, v, mask[None, :, None, :], scale)[0]


def nsa_ref(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale=None,
            block_indices=None, return_block_indices=False):
    """NSA over a whole sequence, the function of fla's parallel_nsa (see the module docstring).
    q (B, T, HQ, D); k, v (B, T, H, D); gates g_* (B, T, HQ), already squashed (sigmoid);
    block_indices (B, T, H, S): given, they replace the top-k choice (compression still runs);
    window_size 0 drops the window branch (g_swa may then be None). -> o (B, T, HQ, D)."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    H = k.size(2)
    if q.size(2) % H:
        raise ValueError(f"n_head ({q.size(2)}) must be a multiple of n_kv_head ({H})")
    k_cmp, v_cmp = compress_kv(k, v, block_size)
    o_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, block_size, scale)
    if block_indices is None:
        block_indices = select_blocks(p_cmp, H, block_size, block_counts)
    o_slc = selected_attention(q, k, v, block_indices, block_size, scale)
    o = o_cmp * g_cmp.unsqueeze(-1) + o_slc * g_slc.unsqueeze(-1)
    if window_size > 0:
        o = o + sliding_window_attention(q, k, v, window_size, scale) * g_swa.unsqueeze(-1)
    return (o, block_indices) if return_block_indices else o


# ----------------------------------------------------------------------------- decoding (caches)

def update_caches(state, k, v, pos, block_size):
    """Write k, v (B, T, H, D) (post-RoPE) for positions pos .. pos+T-1 into the KV cache and
    compress every block that these tokens complete (mean in fp32, stored in the cache's dtype,
    as fla's mean_pooling does). Blocks completed earlier are not touched.
    A 0-d tensor pos (one token, static decoding): the same writes with no shape or branch depending
    on pos -- the mean of the token's block is computed every step and stored only if the token
    completes it (a device-side select), so a CUDA graph can replay the step."""
    if isinstance(pos, torch.Tensor):
        return _update_caches_static(state, k, v, pos, block_size)
    T = k.size(1)
    end = pos + T
    if end > state['k'].size(1):
        raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {state['k'].size(1)}")
    state['k'][:, pos:end] = k
    state['v'][:, pos:end] = v
    c0, c1 = pos // block_size, end // block_size  # blocks c0 .. c1-1 complete within (pos, end]
    if c1 > c0:
        B, _, H, D = k.shape
        for name in ('k', 'v'):
            x = state[name][:, c0 * block_size:c1 * block_size]
            cdt = torch.promote_types(x.dtype, torch.float32)
            state[name + '_cmp'][:, c0:c1] = x.to(cdt).reshape(B, c1 - c0, block_size, H, D).mean(2)


def _update_caches_static(state, k, v, pos, block_size):
    L, n_cmp = state['k'].size(1), state['k_cmp'].size(1)
    c = pos // block_size  # the token's block
    rows = (c * block_size + torch.arange(block_size, device=k.device)).clamp(max=L - 1)
    slot = c.clamp(max=max(n_cmp - 1, 0)).view(1)
    complete = ((pos + 1) % block_size == 0) & (c < n_cmp)
    for name, x in (('k', k), ('v', v)):
        state[name].index_copy_(1, pos.view(1), x.to(state[name].dtype))
        if n_cmp:
            blk = state[name].index_select(1, rows)  # (B, bs, H, D)
            mean = blk.to(torch.promote_types(blk.dtype, torch.float32)).mean(1, keepdim=True)
            old = state[name + '_cmp'].index_select(1, slot)
            state[name + '_cmp'].index_copy_(1, slot, torch.where(complete, mean.to(old.dtype), old))


def gathered_attention(q, kc, vc, tok, valid, scale):
    """Attention of each query over its own list of cached tokens.
    q (B, T, HQ, D); kc, vc (B, L, H, D) caches; tok (B, T, H, N) token positions, valid (B, T, H, N)
    which of them count. The G query heads of a group share their KV head's list. -> (B, T, HQ, D)."""
    B, T, HQ, D = q.shape
    H = kc.size(2)
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, 1, H, 1)
    tok = tok.clamp(0, kc.size(1) - 1)  # invalid slots (before 0, past the cache) read any row
    kg, vg = kc[b, tok, h], vc[b, tok, h]  # (B, T, H, N, D)
    qg = q.reshape(B, T, H, HQ // H, D)
    s = torch.einsum('bthgd,bthnd->bthgn', qg, kg.to(q.dtype)) * scale
    valid = valid.unsqueeze(3)  # (B, T, H, 1, N)
    s = s.masked_fill(~valid, float('-inf'))
    any_key = valid.any(-1, keepdim=True)
    p = torch.where(any_key, torch.softmax(torch.where(any_key, s, torch.zeros_like(s)), -1), torch.zeros_like(s))
    return torch.einsum('bthgn,bthnd->bthgd', p, vg.to(q.dtype)).reshape(B, T, HQ, D)


def nsa_cached(q, state, pos, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale):
    """NSA for T queries at absolute positions pos .. pos+T-1 whose keys are already in the caches
    (update_caches first): the decoding path. Reads only the cached compressed blocks (scores and
    top-k), the tokens of the chosen blocks and the window; the prefix is never recomputed.
    q (B, T, HQ, D) in the compute dtype; state: k, v (B, L, H, D), k_cmp, v_cmp (B, L // bs, H, D)."""
    B, T, HQ, D = q.shape
    H = state['k'].size(2)
    dev = q.device
    t = torch.arange(T, device=dev) + pos  # (T,) absolute query positions
    static = isinstance(pos, torch.Tensor)  # static decoding: every cached block, masked by position
    C = state['k_cmp'].size(1) if static else (pos + T) // block_size  # complete blocks, all cached
    k_cmp, v_cmp = state['k_cmp'][:, :C].to(q.dtype), state['v_cmp'][:, :C].to(q.dtype)
    o_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, block_size, scale, pos=pos)

    # selection: the tokens of the chosen blocks, causal
    n_blocks = -(-state['k'].size(1) // block_size) if static else None
    idx = select_blocks(p_cmp, H, block_size, block_counts, pos=pos, n_blocks=n_blocks)  # (B, T, H, S)
    tok = (idx.unsqueeze(-1) * block_size + torch.arange(block_size, device=dev)).flatten(-2)  # (B, T, H, S*bs)
    valid = (idx.unsqueeze(-1) >= 0).expand(-1, -1, -1, -1, block_size).flatten(-2) & (tok <= t[:, None, None])
    o = o_cmp * g_cmp.unsqueeze(-1)
    o = o + gathered_attention(q, state['k'], state['v'], tok, valid, scale) * g_slc.unsqueeze(-1)

    if window_size > 0:  # the last window_size tokens
        tok = (t[:, None] - window_size + 1 + torch.arange(window_size, device=dev)).expand(B, H, T, -1)
        tok = tok.permute(0, 2, 1, 3)  # (B, T, H, w)
        o = o + gathered_attention(q, state['k'], state['v'], tok, tok >= 0, scale) * g_swa.unsqueeze(-1)
    return o


# ----------------------------------------------------------------------------- fla path (CUDA)

def nsa_fla(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, block_indices=None):
    """fla's kernels for compression + top-k + selection, plus the window branch: by flash-attn if importable
    (as fla's parallel_nsa runs it: flash_attn_func with the default scale, fp16/bf16 only), else fla's
    parallel_attn(window_size=w). Through the custom ops of fla_ops.parallel_nsa, which compose fla's
    Functions as parallel_nsa does (its output and gradients bit for bit, where fla's own backward is
    deterministic). Imported lazily (needs triton)."""
    import fla.ops.nsa.parallel as fla_nsa  # its flash_attn_func is None without flash-attn
    D = q.size(-1)
    use_fa = (window_size > 0 and fla_nsa.flash_attn_func is not None
              and q.dtype in (torch.float16, torch.bfloat16) and abs(scale - D ** -0.5) < 1e-12)
    return fla_ops.parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale,
                                block_indices, flash_attn_func=fla_nsa.flash_attn_func if use_fa else None)


# ----------------------------------------------------------------------------- mixer

class NSAMixer(nn.Module):
    """Native Sparse Attention token mixer (see the module docstring)."""
    static_decode = True  # a tensor pos: RoPE, cache writes and block selection with fixed shapes

    def __init__(self, config, layer_idx=0):
        super().__init__()
        check_nsa_config(config)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.block_size = config.nsa_block_size
        self.block_counts = config.nsa_block_counts
        self.window_size = config.nsa_window_size
        self.rope_theta = config.rope_theta
        self.backend = config.backend
        self.scale = config.head_dim ** -0.5
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.g_proj = nn.Linear(config.n_embd, 3 * config.n_head, bias=config.bias)  # cmp, slc, swa gates
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _use_fla(self, x):
        return model.use_fla(self.backend, x)

    def _branch_args(self):
        return dict(block_size=self.block_size, block_counts=self.block_counts,
                    window_size=self.window_size, scale=self.scale)

    def forward(self, x, state=None, pos=0):
        B, T, C = x.size()
        HQ, H, D = self.n_head, self.n_kv_head, self.head_dim
        q = rotary(self.q_proj(x).view(B, T, HQ, D), pos, self.rope_theta)
        k = rotary(self.k_proj(x).view(B, T, H, D), pos, self.rope_theta)
        v = self.v_proj(x).view(B, T, H, D)
        # three gates per head per token, (h three) layout like fla's NSA layer
        g_cmp, g_slc, g_swa = torch.sigmoid(self.g_proj(x)).view(B, T, HQ, 3).unbind(-1)  # (B, T, HQ) each
        gates = (g_cmp, g_slc, g_swa)
        cdt = torch.promote_types(v.dtype, torch.float32)  # torch paths: fp32 (fp64 for an fp64 model)

        static = isinstance(pos, torch.Tensor)
        if static and T != 1:
            raise ValueError(f"a tensor pos is for one-token steps, got T={T}")
        if not static and (state is None or (pos == 0 and T > 1)):
            # training, or a prefill from an empty cache: the whole-sequence function
            if state is not None:
                update_caches(state, k, v, 0, self.block_size)
            if self._use_fla(x):
                # Under autocast q, k, v are already bf16; a plain fp32 model feeds the kernels bf16 too.
                kdt = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else v.dtype
                kdt = kdt if kdt in (torch.bfloat16, torch.float16) else torch.bfloat16
                o = nsa_fla(q.to(kdt), k.to(kdt), v.to(kdt), *(g.to(kdt) for g in gates), **self._branch_args())
            else:
                with torch.autocast(x.device.type, enabled=False):
                    o = nsa_ref(q.to(cdt), k.to(cdt), v.to(cdt), *(g.to(cdt) for g in gates), **self._branch_args())
        else:
            # decoding step / continuation: PyTorch over the caches on every device
            update_caches(state, k, v, pos, self.block_size)
            with torch.autocast(x.device.type, enabled=False):
                o = nsa_cached(q.to(cdt), state, pos, *(g.to(cdt) for g in gates), **self._branch_args())

        y = o.to(v.dtype).reshape(B, T, HQ * D)
        return self.resid_dropout(self.c_proj(y))

    def init_state(self, batch_size, max_len, device, dtype):
        # KV cache of post-RoPE keys and values, plus one compressed (mean) entry per complete block
        H, D = self.n_kv_head, self.head_dim
        n_cmp = max_len // self.block_size
        z = lambda n: torch.zeros(batch_size, n, H, D, device=device, dtype=dtype)
        return {'k': z(max_len), 'v': z(max_len), 'k_cmp': z(n_cmp), 'v_cmp': z(n_cmp)}

    def flops_per_token(self, T):
        """Forward FLOPs per token of the three branches for a query with T tokens of context (like
        vanilla's count: no halving for causality), per query head, with bs, S, w the block size,
        block count and window and NC = T // bs complete blocks:
            compression  QK^T + AV over NC summaries                       4 D NC
            top-k        the importance scores again (fla's top-k kernel
                         recomputes q . k_cmp rather than storing them)     2 D NC
            selection    QK^T + AV over min(S bs, T) tokens                 4 D min(S bs, T)
            window       QK^T + AV over min(w, T) tokens                    4 D min(w, T)
        Matmul FLOPs only, like the other mixers: mean pooling, sorting and gates are left out.
        tests/test_flops.py checks this against torch's FLOP counter on the decoding reference."""
        D, bs = self.head_dim, self.block_size
        NC = T // bs
        per_head = 6 * D * NC + 4 * D * min(self.block_counts * bs, T) + 4 * D * min(self.window_size, T)
        return self.n_head * per_head


# ----------------------------------------------------------------------------- GPT

def _pow2(n):
    return n >= 1 and (n & (n - 1)) == 0


def check_nsa_config(c):
    """Raise ValueError for a config the chosen backend cannot compute (never a silent wrong result).
    The kernel rules (backend 'auto' / 'fla') come from fla-core 0.6.0's parallel_nsa; 'torch' needs
    only a consistent GQA layout."""
    model.check_backend(c.backend)
    if c.n_kv_head < 1 or c.n_head % c.n_kv_head:
        valid = [h for h in range(1, c.n_head + 1) if c.n_head % h == 0]
        raise ValueError(f"n_head ({c.n_head}) must be a multiple of n_kv_head ({c.n_kv_head}); "
                         f"valid n_kv_head: {valid}")
    if c.head_dim < 2 or c.head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {c.head_dim}")
    if c.nsa_block_size < 1 or c.nsa_block_counts < 1 or c.nsa_window_size < 0:
        raise ValueError(f"need nsa_block_size >= 1, nsa_block_counts >= 1, nsa_window_size >= 0; got "
                         f"{c.nsa_block_size}, {c.nsa_block_counts}, {c.nsa_window_size}")
    if c.nsa_block_size > c.block_size:
        # no complete block fits in the context: the compression branch has nothing to attend to and the
        # selection branch nothing to select, so both contribute 0 and the model is a sliding window only
        raise ValueError(f"nsa_block_size ({c.nsa_block_size}) > block_size ({c.block_size}): no complete block fits "
                         f"in the context, so NSA's compression and selection branches would never see one; use "
                         f"nsa_block_size <= {c.block_size} (or a longer block_size)")
    if c.backend == 'torch':
        return
    kern = "for fla's parallel_nsa (backend 'auto'/'fla'; backend='torch' lifts this)"
    G = c.n_head // c.n_kv_head
    if not (G >= 16 and _pow2(G)):
        valid = [h for h in range(1, c.n_head + 1) if c.n_head % h == 0 and c.n_head // h >= 16 and _pow2(c.n_head // h)]
        hint = (f"with n_head={c.n_head} valid n_kv_head: {valid}" if valid else
                f"n_head={c.n_head} allows none: use n_head = n_kv_head * 16 (or * 32, 64, ...)")
        raise ValueError(f"the GQA group n_head / n_kv_head = {c.n_head}/{c.n_kv_head} must be a power of two "
                         f">= 16 {kern}; {hint}")
    if not (16 <= c.head_dim <= 256 and _pow2(c.head_dim)):
        raise ValueError(f"head_dim must be a power of two in 16..256 {kern}: valid 16, 32, 64, 128, 256; "
                         f"got {c.head_dim}")
    if not (_pow2(c.nsa_block_counts) and c.nsa_block_counts >= 4):
        raise ValueError(f"nsa_block_counts must be a power of two >= 4 {kern} (it rounds the count up to a "
                         f"power of two, and below 3 the forced blocks 0/previous/current tie): valid 4, 8, 16, ...; "
                         f"got {c.nsa_block_counts}")
    if not (_pow2(c.nsa_block_size) and c.nsa_block_size >= max(16, 2 * c.nsa_block_counts)):
        raise ValueError(f"nsa_block_size must be a power of two >= max(16, 2 * nsa_block_counts) = "
                         f"{max(16, 2 * c.nsa_block_counts)} {kern}; got {c.nsa_block_size}")


@dataclass
class GPTConfig(model.BaseConfig):
    model_type: str = setting('nsa', "the token mixer: NSA (Native Sparse Attention)")
    pos_emb: str = setting('none', "'none': RoPE inside the mixer carries position information")
    d_ff: int = setting(-1, D_FF_HELP)
    n_head: int = setting(16, "query heads")
    n_kv_head: int = setting(1, "KV heads (GQA); fla needs n_head / n_kv_head a power of two >= 16")
    head_dim: int = setting(32, "per-head dim of q, k, v (n_head * head_dim need not equal n_embd)")
    nsa_block_size: int = setting(32, "tokens per compression / selection block (at most block_size)")
    nsa_block_counts: int = setting(4, "blocks selected per query (incl. the forced first/previous/current)")
    nsa_window_size: int = setting(64, "sliding-window branch: the last w tokens (0: no window branch)")
    rope_theta: float = setting(10000.0, "RoPE base")
    backend: str = setting('auto', "'auto': fla kernels on CUDA, torch reference elsewhere; 'fla' (CUDA only); 'torch'")

    def __post_init__(self):
        check_nsa_config(self)


class GPT(model.GPT):
    mixer_cls = NSAMixer
    # compiled like the others: fla's NSA kernels are custom ops (fla_ops.parallel_nsa), opaque to Dynamo. Traced
    # directly, fla's functions crashed the compiled backward (SIGSEGV in autograd's functionalization of a view);
    # through the ops the step is one graph equal to eager (tests/test_fla_ops.py), and at B 64 x T 256 on the H200
    # it takes 14.05 ms against 19.74 eager under the CUDA graph
    # (results/training-speedups/gate-apart-and-nsa-compiled/)


# obeys the kernel rules (group 16, head_dim 16, block 16 >= 2*4), so it runs on CUDA too
TINY = dict(n_layer=2, n_embd=64, n_head=16, n_kv_head=1, head_dim=16, nsa_block_size=16, nsa_block_counts=4,
            nsa_window_size=24, block_size=128)


# ----------------------------------------------------------------------------- self-check

rel_rms = model.rel_rms


def fla_block_indices(q, k, v, block_size, block_counts, scale):
    """The block indices fla's parallel_nsa picks internally (mean_pooling -> compression lse ->
    parallel_nsa_topk), for diagnostics. (B, T, H, S), int32, -1 for empty slots."""
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.nsa.parallel import parallel_nsa_topk
    from fla.ops.utils.pooling import mean_pooling
    with torch.no_grad():
        k_cmp, v_cmp = mean_pooling(k, block_size), mean_pooling(v, block_size)
        _, lse = parallel_nsa_compression(q, k_cmp, v_cmp, TK=k.shape[1], block_size=block_size, scale=scale)
        return parallel_nsa_topk(q, k_cmp, TK=k.shape[1], lse=lse, block_counts=block_counts,
                                 block_size=block_size, scale=scale)


def selection_diff(a, b):
    """Per (b, t, h) row: whether the *sets* of selected blocks differ (slot order and -1 padding ignored)."""
    norm = lambda x: torch.sort(x.long().clamp(min=-1), dim=-1).values
    return (norm(a) != norm(b)).any(-1)


def emulated_bf16_selection(q, k, block_size, block_counts, scale):
    """The reference's top-k rule applied to the scores the kernel ranks: q*scale and the mean-pooled
    k_cmp rounded to bf16 (the kernel's operands), products and softmax in fp32. Matching fla's choice
    row for row shows that its departures from the fp32 choice are bf16 rounding of near-ties."""
    qs = (q.float() * scale).bfloat16().float()
    k_cmp = compress_kv(k.float(), k.float(), block_size)[0].bfloat16().float()
    _, p = compressed_attention(qs, k_cmp, k_cmp, block_size, 1.0)
    return select_blocks(p, k.size(2), block_size, block_counts)


def compare_kernel(B=2, T=1000, HQ=16, H=1, D=32, block_size=32, block_counts=4, window_size=64,
                   given_indices=True, dtype=torch.bfloat16, seed=0, device='cuda', q_scale=1.0):
    """fla's parallel_nsa (inputs in `dtype`, window included) against nsa_ref in fp32 on the same
    (rounded) inputs: output and the gradients of q, k, v and the three gates.
    given_indices=True: both get the block indices nsa_ref picks in fp32. False (full path): each picks
    its own; then info also holds 'sel_diff' (share of (b, t, KV head) rows whose choice differs),
    'emu_diff' (share of rows where fla's choice differs from emulated_bf16_selection), 'same_sel'
    (the errors against nsa_ref given the kernel's own choice: everything but the top-k decision) and
    'o_agree' (output error over the rows whose choice agrees).
    Returns ({name: rel RMS}, info)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)
    q, k, v = (rnd(B, T, HQ, D) * q_scale).to(dtype), rnd(B, T, H, D).to(dtype), rnd(B, T, H, D).to(dtype)
    gates = [torch.sigmoid(rnd(B, T, HQ)).to(dtype) for _ in range(3)]
    do = rnd(B, T, HQ, D)
    scale = D ** -0.5
    args = dict(block_size=block_size, block_counts=block_counts, window_size=window_size, scale=scale)
    names = ['o', 'dq', 'dk', 'dv', 'dg_cmp', 'dg_slc', 'dg_swa']

    def reference(block_indices=None):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
        try:
            ins = [t.detach().float().requires_grad_() for t in (q, k, v, *gates)]
            o, idx = nsa_ref(*ins, **args, block_indices=block_indices, return_block_indices=True)
            (o * do).sum().backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return [o.detach()] + [t.grad for t in ins], idx

    want, idx_ref = reference()
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, *gates)]
    o = nsa_fla(*ins, **args, block_indices=idx_ref if given_indices else None)
    (o.float() * do).sum().backward()
    got = [o.detach()] + [t.grad for t in ins]
    errs = {n: rel_rms(a, b) for n, a, b in zip(names, got, want)}
    info = {}
    if not given_indices:
        idx_ker = fla_block_indices(q, k, v, block_size, block_counts, scale).long()[..., :block_counts]
        differs = selection_diff(idx_ker, idx_ref)  # (B, T, H)
        info['sel_diff'] = differs.float().mean().item()
        with torch.no_grad():
            idx_emu = emulated_bf16_selection(q, k, block_size, block_counts, scale)
        info['emu_diff'] = selection_diff(idx_ker, idx_emu).float().mean().item()
        same, _ = reference(block_indices=idx_ker)
        info['same_sel'] = {n: rel_rms(a, b) for n, a, b in zip(names, got, same)}
        agree = (~differs).repeat_interleave(HQ // H, dim=2)  # (B, T, HQ) rows of agreeing queries
        info['o_agree'] = rel_rms(got[0][agree], want[0][agree])
    return errs, info


def selfcheck(device='cuda', tol=1e-2):
    """parallel_nsa (bf16; window branch through flash-attn or parallel_attn) against the fp32 reference,
    outputs and gradients of q, k, v and the gates:
    (a) both given the same block indices (chosen once by the fp32 reference);
    (b) the full path, each choosing its own blocks. bf16 rounding flips near-ties of the top-k on a
        few rows (random inputs make the compression softmax nearly flat; measured on an H200: 0.3% of
        rows at T=1000, fp32 importance gaps <= 5e-6 * G), and a flipped row's selected-branch output
        changes wholesale (plain full-path error ~2%). So (b) passes when
        the kernel equals the reference given the kernel's own choice (everything but the top-k
        decision), the rows whose choice agrees match, and the kernel's choice is the bf16-emulated one.
        Its max_rel_rms is nonetheless the plain full-path worst (the honest figure); the detail says
        why it is larger and gives the figures the pass rests on."""
    results = []
    cfg = dict(B=2, T=1000, HQ=16, H=1, D=32, block_size=32, block_counts=4, window_size=64)
    desc = ' '.join(f"{k}={v}" for k, v in cfg.items())
    fmt = lambda errs: ', '.join(f"{n}={e:.2e}" for n, e in errs.items())
    errs, _ = compare_kernel(**cfg, given_indices=True, device=device)
    worst = max(errs, key=errs.get)
    results.append(dict(name="parallel_nsa(bf16) vs fp32 ref, same given block indices", ok=errs[worst] < tol,
                        max_rel_rms=errs[worst], detail=f"{desc}; worst {worst}; {fmt(errs)}"))
    errs, info = compare_kernel(**cfg, given_indices=False, device=device)
    same = info['same_sel']
    worst, worst_same = max(errs, key=errs.get), max(same, key=same.get)
    # headline: the plain full-path error, the kernel's output against the fp32 reference's as they are
    # (its worst is on the rows whose near-tied choice bf16 flipped); passes on what must match exactly
    results.append(dict(
        name="parallel_nsa(bf16) full path (own compression + top-k) vs fp32 ref",
        ok=same[worst_same] < tol and info['o_agree'] < tol and info['emu_diff'] < 1e-3,
        max_rel_rms=errs[worst],
        detail=f"{desc}; plain full path worst {worst} {errs[worst]:.2e} because the choice of blocks differs on "
               f"{100 * info['sel_diff']:.2f}% of rows (near-tied blocks whose order bf16 rounding flips: the "
               f"kernel's choice differs from the bf16-emulated one on {100 * info['emu_diff']:.3f}%), and such "
               f"a row's selected output changes wholesale; passes on: vs ref given the kernel's choice worst "
               f"{worst_same} {same[worst_same]:.2e}, o on agreeing rows {info['o_agree']:.2e} (tol {tol:g}), "
               f"emulated-choice mismatch < 0.1%; plain full path: {fmt(errs)}; given the kernel's choice: "
               f"{fmt(same)}"))
    return results


if __name__ == '__main__':
    for r in selfcheck():
        print(('OK  ' if r['ok'] else 'FAIL'), r['name'], f"max_rel_rms={r['max_rel_rms']:.2e}", r['detail'])
