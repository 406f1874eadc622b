"""Tests for model_delta (DeltaNet): the PyTorch references, the model's decoding paths, and (marked
cuda) fla's chunk_delta_rule against the reference."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402
import model_delta as md  # noqa: E402
from helpers import mixer_grad_errors, unit_scale_mixers_  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rand_delta_inputs(B, T, H, Dk, Dv, dtype=torch.float64, seed=0, device='cpu'):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype, device=device)
    q, k, v = rnd(B, T, H, Dk), md.l2norm(rnd(B, T, H, Dk)), rnd(B, T, H, Dv)
    beta = torch.sigmoid(rnd(B, T, H))
    h0 = rnd(B, H, Dk, Dv)
    return q, k, v, beta, h0


def run_with_grads(fn, inputs, do, dS, **kw):
    """fn(q, k, v, beta, initial_state=h0) -> (o, S); returns [o, S, dq, dk, dv, dbeta, dh0]."""
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    o, S = fn(*ins[:4], initial_state=ins[4], **kw)
    ((o * do).sum() + (S * dS).sum()).backward()
    return [o.detach(), S.detach()] + [t.grad for t in ins]


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize('neg_eigval', [False, True], ids=['beta_0_1', 'beta_0_2'])
@pytest.mark.parametrize('T', [1, 63, 100, 129, 256])
def test_chunk_ref_matches_recurrent_ref(T, neg_eigval):
    """The chunked reference equals the token-by-token one, outputs, final state and every gradient, at odd
    lengths and two chunk sizes; with beta in (0, 2) too (allow_neg_eigval), where I - beta k k^T can reflect."""
    B, H, Dk, Dv = 2, 3, 16, 8   # Dk != Dv, so no transposed-state mix-up can hide
    q, k, v, beta, h0 = rand_delta_inputs(B, T, H, Dk, Dv, seed=T + 100 * neg_eigval)
    inputs = (q, k, v, 2 * beta if neg_eigval else beta, h0)
    assert (inputs[3] > 1).any() == neg_eigval and (inputs[3] < 2).all()
    g = torch.Generator().manual_seed(1 + neg_eigval)
    do = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    dS = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    want = run_with_grads(md.delta_rule_recurrent_ref, inputs, do, dS, scale=0.3)
    for C in (64, 16):
        got = run_with_grads(md.delta_rule_chunk_ref, inputs, do, dS, scale=0.3, chunk_size=C)
        for name, a, b in zip(['o', 'S', 'dq', 'dk', 'dv', 'dbeta', 'dh0'], got, want):
            assert a.shape == b.shape, name
            assert md.rel_rms(a, b) < 1e-8, (name, C, md.rel_rms(a, b))


def test_refs_without_initial_state_and_fp32():
    q, k, v, beta, _ = rand_delta_inputs(1, 70, 2, 8, 8, dtype=torch.float32)
    o1, S1 = md.delta_rule_recurrent_ref(q, k, v, beta)
    o2, S2 = md.delta_rule_chunk_ref(q, k, v, beta)
    assert o2.dtype == torch.float32 and S2.dtype == torch.float32
    assert md.rel_rms(o2, o1) < 1e-5 and md.rel_rms(S2, S1) < 1e-5
    # no initial state == a zero initial state
    o3, S3 = md.delta_rule_chunk_ref(q, k, v, beta, initial_state=torch.zeros(1, 2, 8, 8))
    assert torch.equal(o3, o2) and torch.equal(S3, S2)


def test_recurrent_ref_is_the_delta_rule():
    """Check the oracle itself against properties of the math, not against other code:
    with beta = 1 and a unit key, reading k_t right after writing it returns exactly v_t, and the
    memory of directions orthogonal to k_t is untouched; scale multiplies the output."""
    B, H, D = 1, 2, 6
    q, k, v, _, h0 = rand_delta_inputs(B, 1, H, D, D)
    k = k / k.norm(dim=-1, keepdim=True)  # exactly unit (l2norm's eps leaves 1e-7 off)
    beta = torch.ones(B, 1, H, dtype=torch.float64)
    o, S = md.delta_rule_recurrent_ref(k, k, v, beta, scale=1.0, initial_state=h0)
    torch.testing.assert_close(o, v, rtol=1e-12, atol=1e-12)          # S^T k = v: k now stores v
    # a direction orthogonal to k reads the same as before the write
    x = torch.randn(B, H, D, dtype=torch.float64)
    kk = k[:, 0]
    x = x - (x * kk).sum(-1, keepdim=True) * kk
    torch.testing.assert_close(torch.einsum('bhk,bhkv->bhv', x, S), torch.einsum('bhk,bhkv->bhv', x, h0),
                               rtol=1e-12, atol=1e-12)
    o2, _ = md.delta_rule_recurrent_ref(k, k, v, beta, scale=0.5, initial_state=h0)
    torch.testing.assert_close(o2, 0.5 * v, rtol=1e-12, atol=1e-12)
    # beta = 0 writes nothing
    o3, S3 = md.delta_rule_recurrent_ref(q, k, v, torch.zeros_like(beta), initial_state=h0)
    torch.testing.assert_close(S3, h0, rtol=0, atol=0)


def test_recurrent_ref_with_beta_two_reflects():
    """The math with beta = 2 and a unit key: I - 2 k k^T is the reflection across k's orthogonal plane, so
    reading k after the write gives 2 v - (what k read before), other directions are untouched, and two
    writes of the same (k, v) give back the initial state (a reflection is its own inverse) ."""
    B, H, D = 1, 2, 6
    _, k, v, _, h0 = rand_delta_inputs(B, 1, H, D, D, seed=5)
    k = k / k.norm(dim=-1, keepdim=True)
    two = torch.full((B, 1, H), 2.0, dtype=torch.float64)
    o, S = md.delta_rule_recurrent_ref(k, k, v, two, scale=1.0, initial_state=h0)
    before = torch.einsum('bhk,bhkv->bhv', k[:, 0], h0)
    torch.testing.assert_close(o[:, 0], 2 * v[:, 0] - before, rtol=1e-12, atol=1e-12)
    x = torch.randn(B, H, D, dtype=torch.float64)
    x = x - (x * k[:, 0]).sum(-1, keepdim=True) * k[:, 0]
    torch.testing.assert_close(torch.einsum('bhk,bhkv->bhv', x, S), torch.einsum('bhk,bhkv->bhv', x, h0),
                               rtol=1e-12, atol=1e-12)
    _, S2 = md.delta_rule_recurrent_ref(k.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                                        two.repeat(1, 2, 1), initial_state=h0)
    torch.testing.assert_close(S2, h0, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    q, k, v, beta, _ = rand_delta_inputs(1, 5, 2, 4, 4)
    with pytest.raises(ValueError, match='expected q, k'):
        md.delta_rule_chunk_ref(q, k, v, beta[..., :1])
    with pytest.raises(ValueError, match='backend must be one of'):
        md.GPT(md.GPTConfig(**md.TINY, backend='triton'))
    m = md.GPT(md.GPTConfig(**md.TINY, backend='fla'))
    with pytest.raises(RuntimeError, match="backend='fla' needs CUDA"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_short_conv_cache():
    torch.manual_seed(0)
    for K in (1, 2, 4):
        conv = md.ShortConv(5, K).double()
        x = torch.randn(2, 9, 5, dtype=torch.float64)
        full = conv(x)
        cache = conv.init_cache(2, 'cpu', torch.float64)
        parts = [conv(x[:, :4], cache)] + [conv(x[:, t:t + 1], cache) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)
        # the shifted sums are a causal depthwise conv (cross-correlation, zero history) + SiLU
        ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), conv.weight, groups=5).transpose(1, 2))
        torch.testing.assert_close(full, ref, rtol=1e-12, atol=1e-12)


def test_fused_linear_and_conv_equal_the_separate_layers():
    """The mixers run their input projections as one matmul and their q/k/v convs as one conv; that
    must be the separate layers' function: with and without biases (a layer without one gets zeros),
    and step by step through the one shared cache."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(8, o, bias=b).double() for o, b in ((5, True), (3, False), (4, True))]
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(md.fused_linear(x, lins), torch.cat([lin(x) for lin in lins], -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(md.fused_linear(x, lins[1:2]), lins[1](x), rtol=1e-12, atol=1e-12)
    convs = [md.ShortConv(c, 4).double() for c in (5, 3, 4)]
    h = torch.randn(2, 7, 12, dtype=torch.float64)
    want = torch.cat([c(t) for c, t in zip(convs, h.split([5, 3, 4], -1))], -1)
    torch.testing.assert_close(md.fused_short_conv(h, convs), want, rtol=1e-12, atol=1e-12)
    cache = md.fused_conv_cache(convs, 2, 'cpu', torch.float64)
    assert cache.shape == (2, 3, 12)
    parts = [md.fused_short_conv(h[:, :3], convs, cache)]
    parts += [md.fused_short_conv(h[:, t:t + 1], convs, cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('bias, neg', [(False, False), (True, False), (False, True)])
def test_mixer_equals_its_layers_one_by_one(bias, neg):
    """The mixer (fused projections and convs) against the recipe written out layer by layer: each
    projection through its own conv, the delta-rule oracle, the norm and c_proj. Ties each weight to
    its role, which the fused helpers' own test can't (a swapped q/k in the fused list would pass it)."""
    torch.manual_seed(0)
    mx = md.DeltaNetMixer(md.GPTConfig(**{**md.TINY, 'bias': bias, 'allow_neg_eigval': neg})).double().eval()
    with torch.no_grad():
        for p in mx.parameters():  # unit-scale weights, non-zero biases: every term matters
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.5)
    x = torch.randn(2, 37, md.TINY['n_embd'], dtype=torch.float64)
    B, T, _ = x.shape
    H, D = mx.n_head, mx.head_dim
    q, k, v = (conv(proj(x)).view(B, T, H, D) for conv, proj in
               ((mx.q_conv, mx.q_proj), (mx.k_conv, mx.k_proj), (mx.v_conv, mx.v_proj)))
    beta = torch.sigmoid(mx.b_proj(x)) * (2 if neg else 1)  # allow_neg_eigval: beta in (0, 2), as fla's layer
    o, _ = md.delta_rule_recurrent_ref(md.l2norm(q), md.l2norm(k), v, beta, mx.scale)
    want = mx.c_proj(mx.o_norm(o).reshape(B, T, H * D))
    torch.testing.assert_close(mx(x), want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- model level (CPU, TINY)

def tiny(seed=0, dtype=torch.float32, **kw):
    """TINY DeltaNet in eval mode, re-initialised at unit scale (std 1/sqrt(fan_in)) so that the mixer
    and MLP dominate the residual stream and greedy decoding is neither a near-tie nor a constant
    repeat of the last token, as it is at the 0.02 init with a tied head."""
    torch.manual_seed(seed)
    m = md.GPT(md.GPTConfig(**{**md.TINY, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return m.to(dtype).eval()


def test_param_count_full_config():
    n = model.build_model('delta').get_num_params(False)
    assert abs(n / 10_745_088 - 1) < 0.03, n


@pytest.mark.parametrize('prompt_len', [1, 63, 256])
def test_generate_cached_equals_uncached(prompt_len):
    m = tiny(seed=prompt_len)
    idx = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    a = m.generate(idx, 12, temperature=0, use_cache=True)
    b = m.generate(idx, 12, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert len(set(a[:, prompt_len:].flatten().tolist())) > 2  # not a degenerate constant continuation


def test_batch_independence():
    m = tiny()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 65, (3, 100), generator=g)
    base, _ = m(idx)
    for j in range(3):
        idx2 = idx.clone()
        idx2[j] = torch.randint(0, 65, (100,), generator=g)
        out, _ = m(idx2)
        for i in range(3):
            if i != j:
                torch.testing.assert_close(out[i], base[i], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out[j], base[j])


@pytest.mark.parametrize('t', [0, 30, 63, 64, 98])
def test_causality(t):
    m = tiny()
    idx = torch.randint(0, 65, (1, 100), generator=torch.Generator().manual_seed(2))
    base, _ = m(idx)
    idx2 = idx.clone()
    idx2[0, t + 1] = (idx[0, t + 1] + 1) % 65
    out, _ = m(idx2)
    torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_decode_continuation_matches_full_forward(dtype):
    m = tiny(dtype=dtype)
    idx = torch.randint(0, 65, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = m(idx)
        state = m.init_state(2, 150)
        assert state.layers[0]['S'].dtype == torch.promote_types(dtype, torch.float32)
        pieces = [m(idx[:, :70], state=state)[0]]          # prefill
        pieces += [m(idx[:, t:t + 1], state=state)[0] for t in range(70, 80)]  # decode steps
        pieces += [m(idx[:, 80:150], state=state)[0]]      # a multi-token continuation from a state
    assert state.pos == 150
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert md.rel_rms(torch.cat(pieces, 1), full) < tol


def test_negative_eigenvalues_model_decodes_and_trains():
    """allow_neg_eigval changes the function (beta doubled), and the model keeps its contracts: cached
    decoding equals the full forward, every parameter gets a gradient."""
    m, m0 = tiny(dtype=torch.float64, allow_neg_eigval=True), tiny(dtype=torch.float64)
    idx = torch.randint(0, 65, (2, 90), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = m(idx)
        assert not torch.allclose(full, m0(idx)[0])
        state = m.init_state(2, 90)
        pieces = [m(idx[:, :70], state=state)[0]] + [m(idx[:, t:t + 1], state=state)[0] for t in range(70, 90)]
    assert md.rel_rms(torch.cat(pieces, 1), full) < 1e-10
    m.train()
    m(idx, targets=idx)[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_training_step_cpu():
    m = tiny(dtype=torch.float32).train()
    idx = torch.randint(0, 65, (2, 64))
    _, loss = m(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_cpu_autocast_bf16_runs():
    m = tiny(dtype=torch.float32)
    idx = torch.randint(0, 65, (1, 40))
    ref, _ = m(idx)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, _ = m(idx)
        gen = m.generate(idx[:, :5], 4, temperature=0)
    assert md.rel_rms(out.float(), ref) < 5e-2
    assert gen.shape == (1, 9)


# ----------------------------------------------------------------------------- CUDA (fla)

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [63, 256, 1000, 4096])
@pytest.mark.parametrize('l2norm_in_kernel', [True, False])
def test_fla_chunk_delta_rule_vs_ref(T, l2norm_in_kernel):
    errs = md.compare_chunk_kernel(B=2, T=T, H=4, D=64, l2norm_in_kernel=l2norm_in_kernel, seed=T)
    bad = {n: e for n, e in errs.items() if not e < 1e-2}
    assert not bad, errs


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [63, 256, 1000, 4096])
def test_fla_chunk_delta_rule_neg_eigval_vs_ref(T):
    """allow_neg_eigval: the kernel takes beta as given, here in (0, 2); the model's call (q/k L2 norm in
    the kernel) against the fp32 reference, outputs and every gradient. Same shapes as the test above."""
    errs = md.compare_chunk_kernel(B=2, T=T, H=4, D=64, l2norm_in_kernel=True, seed=T, neg_eigval=True)
    bad = {n: e for n, e in errs.items() if not e < 1e-2}
    assert not bad, errs


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [1, 63, 100, 256])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fla_short_conv_vs_torch(T, dtype):
    """short_conv through fla's causal_conv1d (training, no cache) against its shifted-sum form in fp64:
    output, input gradient and weight gradient, on a strided input (a slice of a wider matmul output, as
    the mixers pass it). fp32 inputs: 1e-5 relative RMS (both accumulate in fp32); bf16: 1e-2 (bf16
    rounding of the output and the input gradient)."""
    torch.manual_seed(T)
    w0 = md.ShortConv(96, 4).weight.detach().cuda()                 # (C, 1, K), fp32 like the model's
    wide = torch.randn(3, T, 128, device='cuda', dtype=dtype)
    dy = torch.randn(3, T, 96, device='cuda', dtype=dtype)
    got, want = [], []
    for fla, out in ((True, got), (False, want)):
        src = (wide if fla else wide.double()).detach().requires_grad_()
        w = (w0 if fla else w0.double()).clone().requires_grad_()
        y = md.short_conv(src[..., 16:112], w, fla=fla)                # a view with row stride 128
        (y.double() * dy.double()).sum().backward()
        out += [y, src.grad[..., 16:112], w.grad]
        assert not src.grad[..., :16].any() and not src.grad[..., 112:].any()
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(('y', 'dx', 'dw'), got, want):
        assert md.rel_rms(a, b) < tol, (name, md.rel_rms(a, b))


@cuda
@pytest.mark.cuda
def test_selfcheck_cuda():
    for r in md.selfcheck('cuda'):
        assert r['ok'], r


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('prompt_len', [1, 63, 256])
def test_generate_cached_equals_uncached_cuda(prompt_len):
    """Cached decoding (fla prefill + fp32 torch steps) against uncached (fla over the whole
    sequence each step), under bf16 autocast. The two paths round differently (the kernel computes
    in bf16), so an exact token match is required except where greedy decoding hits a near-tie:
    at the first differing token, the uncached logits' top-2 gap must be below bf16 noise."""
    m = tiny(seed=prompt_len, dtype=torch.float32).cuda()
    idx = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        a = m.generate(idx, 12, temperature=0, use_cache=True)
        b = m.generate(idx, 12, temperature=0, use_cache=False)
        if not torch.equal(a, b):
            j = int((a != b).any(0).nonzero()[0])
            rows = (a[:, j] != b[:, j]).nonzero().flatten()
            logits, _ = m(b[:, :j], last_only=True)
            top2 = logits[rows, -1].float().topk(2, dim=-1).values
            gap = (top2[:, 0] - top2[:, 1]).max().item()
            assert gap < 0.1, f"cached/uncached diverge at token {j} with a top-2 logit gap of {gap:.3f}"


@cuda
@pytest.mark.cuda
def test_decode_continuation_cuda_fla():
    """Prefill through fla (state in and out), decode steps through the torch step, continuation
    through fla again: the logits follow the full forward up to bf16 kernel noise."""
    m = tiny(dtype=torch.float32).cuda()
    idx = torch.randint(0, 65, (2, 300), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        full, _ = m(idx)
        state = m.init_state(2, 300)
        pieces = [m(idx[:, :130], state=state)[0]]
        pieces += [m(idx[:, t:t + 1], state=state)[0] for t in range(130, 140)]
        pieces += [m(idx[:, 140:], state=state)[0]]
        m_ref = tiny(dtype=torch.float32, backend='torch').cuda()
        m_ref.load_state_dict(m.state_dict())
        ref, _ = m_ref(idx)
    got = torch.cat(pieces, 1)
    assert md.rel_rms(full, ref) < 2e-2
    assert md.rel_rms(got, ref) < 2e-2
    # batch rows are not mixed up (the kernel's output and state are per row)
    assert md.rel_rms(got[1], ref[1]) < 2e-2 and md.rel_rms(got[0], ref[0]) < 2e-2


@cuda
@pytest.mark.cuda
def test_model_fwd_bwd_fla_vs_torch():
    """The same weights through the fla path (fp32 model: the mixer feeds the kernel bf16) and the torch
    path (fp32 throughout), with the mixers at unit scale (tests/helpers.py; at GPT-2's init a mixer barely
    moves the residual stream and its gradients are tiny): the loss, and each mixer parameter's gradient
    within MIXER_TOL = 3e-2 relative RMS. That is the kernel's own 1e-2 (on identical bf16 inputs), plus
    the rounding of its inputs to bf16, which the torch path doesn't do, through two layers; a weight in
    the wrong role or a wrong gate is an O(1) error."""
    MIXER_TOL = 3e-2
    torch.manual_seed(0)
    m_fla = unit_scale_mixers_(md.GPT(md.GPTConfig(**md.TINY, backend='fla'))).cuda()
    m_ref = md.GPT(md.GPTConfig(**md.TINY, backend='torch')).cuda()
    m_ref.load_state_dict(m_fla.state_dict())
    idx = torch.randint(0, 65, (4, 512), device='cuda')
    tgt = torch.randint(0, 65, (4, 512), device='cuda')
    _, loss_fla = m_fla(idx, targets=tgt)
    loss_fla.backward()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        _, loss_ref = m_ref(idx, targets=tgt)
        loss_ref.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert abs(loss_fla.item() / loss_ref.item() - 1) < 1e-2
    errs = mixer_grad_errors(m_fla, m_ref, md.rel_rms)
    assert len(errs) == 2 * len(list(m_fla.transformer.h[0].mixer.parameters()))
    assert all(e < MIXER_TOL for e in errs.values()), errs
    assert all(torch.isfinite(p.grad).all() for p in m_fla.parameters())
    # and a bf16-autocast training step on the fla path runs with finite gradients
    m_fla.zero_grad()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        _, loss = m_fla(idx, targets=tgt)
    loss.backward()
    assert abs(loss.item() / loss_ref.item() - 1) < 3e-2
    assert all(torch.isfinite(p.grad).all() for p in m_fla.parameters())
