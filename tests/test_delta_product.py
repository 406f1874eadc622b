"""Gated DeltaProduct: references against each other and the paper's formula (CPU, float64), the model's
decoding paths (CPU), and fla's kernel against the references (CUDA-marked)."""

import os
import sys

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fla_ops  # noqa: E402
import model  # noqa: E402
import model_delta_product as dp  # noqa: E402
from helpers import mixer_grad_errors, unit_scale_mixers_  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True, scope='module')
def one_cpu_thread():
    """These tests run many tiny ops: intra-op threads only add synchronisation, and on a busy 2-core
    machine their spin-waits made single decode steps take ~100x longer. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(B, T, H, Dk, Dv, n, dtype=torch.float64, device='cpu', gate=True, neg_eigval=False, seed=0):
    """Random inputs in fla's layout; q and k unit-norm per head (what the mixer feeds the recurrence)."""
    gen = torch.Generator(device='cpu').manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def uni(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return dict(
        q=dp.l2norm(rnd(B, T, H, Dk)), k=dp.l2norm(rnd(B, T * n, H, Dk)), v=rnd(B, T * n, H, Dv),
        g=F.logsigmoid(rnd(B, T, H) + 1) if gate else None,
        beta=uni(B, T * n, H) * (2 if neg_eigval else 1),
        initial_state=rnd(B, H, Dk, Dv) * 0.5)


def run_with_grads(fn, inputs, n, seed=1, **kw):
    """fn's output and final state, and the gradient of a random linear function of both w.r.t. every input."""
    leaf = {key: (t.detach().clone().requires_grad_() if t is not None else None) for key, t in inputs.items()}
    o, S = fn(leaf['q'], leaf['k'], leaf['v'], leaf['g'], leaf['beta'], initial_state=leaf['initial_state'],
              num_householder=n, **kw)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S)
    ((o * do).sum() + (S * dS).sum()).backward()
    return {'o': o.detach(), 'final_state': S.detach(),
            **{f'd{key}': t.grad for key, t in leaf.items() if t is not None}}


# ----------------------------------------------------------------------------- references (CPU, float64)

@pytest.mark.parametrize('neg_eigval', [False, True])
@pytest.mark.parametrize('n', [1, 2])
@pytest.mark.parametrize('T', [1, 63, 100, 256])
def test_chunked_ref_matches_recurrent_ref(T, n, neg_eigval):
    inputs = make_inputs(2, T, 2, 16, 12, n, neg_eigval=neg_eigval, seed=T + 10 * n)
    rec = run_with_grads(dp.naive_recurrent_gated_delta_product, inputs, n)
    chk = run_with_grads(dp.chunk_gated_delta_product_ref, inputs, n)
    assert set(rec) == {'o', 'final_state', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dinitial_state'}
    for key in rec:
        assert torch.isfinite(chk[key]).all(), key
        assert rel_rms(chk[key], rec[key]) < 1e-10, (key, rel_rms(chk[key], rec[key]))


@pytest.mark.parametrize('chunk_size', [1, 16, 64])
def test_chunked_ref_any_chunk_size(chunk_size):
    inputs = make_inputs(1, 37, 3, 8, 8, 3, neg_eigval=True, seed=3)
    rec = run_with_grads(dp.naive_recurrent_gated_delta_product, inputs, 3)
    chk = run_with_grads(dp.chunk_gated_delta_product_ref, inputs, 3, chunk_size=chunk_size)
    for key in rec:
        assert rel_rms(chk[key], rec[key]) < 1e-10, key


def paper_recurrence(q, k, v, g, beta, initial_state, num_householder):
    """DeltaProduct as the paper writes it, state H of shape (Dv, Dk), one (b, h) pair at a time:
    H <- alpha_t H; for j: H <- H (I - beta k k^T) + beta v k^T; o_t = H q_t / sqrt(Dk)."""
    B, T, Hn, Dk = q.shape
    n = num_householder
    o = torch.zeros(B, T, Hn, v.shape[-1], dtype=q.dtype)
    final = torch.zeros_like(initial_state)
    eye = torch.eye(Dk, dtype=q.dtype)
    for b in range(B):
        for h in range(Hn):
            S = initial_state[b, h].T.clone()
            for t in range(T):
                if g is not None:
                    S = g[b, t, h].exp() * S
                for j in range(n):
                    kk, vv, bb = k[b, t * n + j, h], v[b, t * n + j, h], beta[b, t * n + j, h]
                    S = S @ (eye - bb * torch.outer(kk, kk)) + bb * torch.outer(vv, kk)
                o[b, t, h] = S @ q[b, t, h] * Dk ** -0.5
            final[b, h] = S.T
    return o, final


def plain_delta_rule(q, k, v, beta, initial_state):
    """DeltaNet (no gate, one step per token): S_t = S_{t-1} - beta k (S_{t-1}^T k - v)^T, o = S^T q / sqrt(Dk)."""
    S, outs = initial_state, []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        pred = torch.einsum('bhkv,bhk->bhv', S, kt)
        S = S - bt[..., None, None] * torch.einsum('bhk,bhv->bhkv', kt, pred - vt)
        outs.append(torch.einsum('bhkv,bhk->bhv', S, q[:, t]) * q.shape[-1] ** -0.5)
    return torch.stack(outs, 1), S


@pytest.mark.parametrize('n', [1, 2, 3])
def test_refs_match_paper_formula(n):
    x = make_inputs(2, 20, 2, 6, 5, n, neg_eigval=True, seed=7)
    o_p, S_p = paper_recurrence(x['q'], x['k'], x['v'], x['g'], x['beta'], x['initial_state'], n)
    for fn in (dp.naive_recurrent_gated_delta_product, dp.chunk_gated_delta_product_ref):
        o, S = fn(x['q'], x['k'], x['v'], x['g'], x['beta'], initial_state=x['initial_state'], num_householder=n)
        assert rel_rms(o, o_p) < 1e-12 and rel_rms(S, S_p) < 1e-12, fn.__name__


def test_one_householder_without_gate_is_the_delta_rule():
    x = make_inputs(2, 70, 2, 8, 8, 1, gate=False, seed=5)
    o_d, S_d = plain_delta_rule(x['q'], x['k'], x['v'], x['beta'], x['initial_state'])
    for fn in (dp.naive_recurrent_gated_delta_product, dp.chunk_gated_delta_product_ref):
        o, S = fn(x['q'], x['k'], x['v'], None, x['beta'], initial_state=x['initial_state'], num_householder=1)
        assert rel_rms(o, o_d) < 1e-12 and rel_rms(S, S_d) < 1e-12, fn.__name__


def test_gate_sits_before_the_householder_steps():
    """Guard against a reference that decays after the updates: with k = 0 for the first sub-step
    (a no-op update) the two orders agree, so use real keys and check against the paper's order."""
    x = make_inputs(1, 3, 1, 4, 4, 2, seed=11)
    x['g'] = torch.full_like(x['g'], -3.0)  # strong decay, so the order matters a lot
    o_p, _ = paper_recurrence(x['q'], x['k'], x['v'], x['g'], x['beta'], x['initial_state'], 2)
    o, _ = dp.chunk_gated_delta_product_ref(x['q'], x['k'], x['v'], x['g'], x['beta'],
                                            initial_state=x['initial_state'], num_householder=2)
    assert rel_rms(o, o_p) < 1e-12


def test_references_ignore_autocast():
    """The recurrences keep fp32 math under autocast (it would otherwise run their matmuls in bf16)."""
    x = {key: t.float() for key, t in make_inputs(2, 50, 2, 16, 16, 2, seed=9).items()}
    for fn in (dp.naive_recurrent_gated_delta_product, dp.chunk_gated_delta_product_ref):
        want = fn(**x, num_householder=2)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = fn(**x, num_householder=2)
        assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(got, want)), fn.__name__


def test_bad_shapes_raise():
    x = make_inputs(1, 8, 2, 4, 4, 2)
    with pytest.raises(ValueError, match='num_householder'):
        dp.chunk_gated_delta_product_ref(x['q'], x['k'], x['v'], x['g'], x['beta'], num_householder=1)


# ----------------------------------------------------------------------------- the model (CPU)

@pytest.mark.parametrize('kw', [dict(bias=True), dict(num_householder=1, allow_neg_eigval=True)])
def test_mixer_equals_its_layers_one_by_one(kw):
    """The mixer (all six projections as one matmul, the q/k/v convs as one conv) against the recipe
    written out layer by layer with the token-by-token oracle: ties each weight to its role (with
    num_householder=1 the beta and forget-gate projections have the same width, so only this catches
    them swapped)."""
    torch.manual_seed(0)
    mx = dp.GatedDeltaProductMixer(dp.GPTConfig(**{**dp.TINY, **kw})).double().eval()
    with torch.no_grad():
        for p in mx.parameters():  # unit-scale weights, non-zero biases: every term matters
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.5)
    x = torch.randn(2, 37, dp.TINY['n_embd'], dtype=torch.float64)
    B, T, _ = x.shape
    H, Dk, Dv, n = mx.n_head, mx.head_k_dim, mx.head_v_dim, mx.num_householder
    q = mx.q_conv(mx.q_proj(x)).reshape(B, T, H, Dk)
    k = mx.k_conv(mx.k_proj(x)).reshape(B, T * n, H, Dk)
    v = mx.v_conv(mx.v_proj(x)).reshape(B, T * n, H, Dv)
    beta = mx.b_proj(x).sigmoid().reshape(B, T * n, H) * (2 if mx.allow_neg_eigval else 1)
    g = -mx.A_log.exp() * F.softplus(mx.a_proj(x) + mx.dt_bias)
    o, _ = dp.naive_recurrent_gated_delta_product(dp.l2norm(q), dp.l2norm(k), v, g, beta, mx.scale,
                                                  num_householder=n)
    want = mx.c_proj(mx.o_norm(o, mx.g_proj(x).reshape(B, T, H, Dv)).reshape(B, T, H * Dv))
    torch.testing.assert_close(mx(x), want, rtol=1e-10, atol=1e-10)


def tiny_model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = dp.GPT(dp.GPTConfig(**{**dp.TINY, **kw}))
    return m.to(dtype).eval()


def test_default_config_params_match_vanilla():
    n = model.count_params(dp.GPTConfig(), dp.GPT)
    assert model.count_params(model.GPTConfig(), model.GPT) == 10_745_088  # vanilla, the target
    assert abs(n / 10_745_088 - 1) < 0.03, n


def test_build_model_and_flags():
    m = model.build_model('delta_product', **dp.TINY)
    mixer = m.transformer.h[0].mixer
    assert isinstance(mixer, dp.GatedDeltaProductMixer)
    assert mixer.A_log._no_weight_decay and mixer.dt_bias._no_weight_decay
    assert torch.isfinite(mixer.A_log).all() and (mixer.A_log.exp() >= 1).all()
    with pytest.raises(ValueError, match='backend'):
        dp.GPT(dp.GPTConfig(**{**dp.TINY, 'backend': 'cuda'}))
    with pytest.raises(ValueError, match='expand_v'):
        dp.GPT(dp.GPTConfig(**{**dp.TINY, 'expand_v': 0.3}))


def test_fla_backend_on_cpu_raises():
    m = tiny_model(torch.float32, backend='fla')
    with pytest.raises(RuntimeError, match='CUDA'):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_every_parameter_gets_a_gradient():
    m = tiny_model(torch.float32, allow_neg_eigval=True).train()
    idx = torch.randint(0, 65, (2, 40))
    _, loss = m(idx, idx)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('prompt_len', [1, 63, 256])
def test_generate_cached_equals_uncached(prompt_len):
    m = tiny_model()
    idx = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    a = m.generate(idx, 8, temperature=0, use_cache=True)
    b = m.generate(idx, 8, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_prefill_continuation_and_steps_match_full_forward():
    m = tiny_model(allow_neg_eigval=True)
    idx = torch.randint(0, 65, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = m(idx)
        state = m.init_state(2, 100)
        parts = [m(idx[:, :37], state=state)[0], m(idx[:, 37:57], state=state)[0]]  # prefill, T>1 continuation
        parts += [m(idx[:, t:t + 1], state=state)[0] for t in range(57, 100)]     # decode steps
        assert state.pos == 100
        assert rel_rms(torch.cat(parts, 1), full) < 1e-12
        state.reset()
        again, _ = m(idx[:, :10], state=state)
        assert rel_rms(again, full[:, :10]) < 1e-12


def test_batch_independence():
    m = tiny_model()
    idx = torch.randint(0, 65, (3, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together, _ = m(idx)
        for i in range(3):
            alone, _ = m(idx[i:i + 1])
            assert rel_rms(together[i:i + 1], alone) < 1e-12


def test_causality():
    m = tiny_model()
    idx = torch.randint(0, 65, (1, 80), generator=torch.Generator().manual_seed(3))
    idx2 = idx.clone()
    idx2[0, 40] = (idx[0, 40] + 1) % 65
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(idx2)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


# ----------------------------------------------------------------------------- fla kernel (CUDA)

# model-level CUDA tests use the kernel tests' head shapes (4 heads of 64), so that fla's first-call
# autotuning (minutes on a fresh machine) is paid once
GPU_SHAPES = dict(n_head=4, head_dim=64, d_ff=128)  # the kernel's head size; d_ff given: too wide to match at n_embd 64

def kernel_vs_ref(T, neg_eigval=False, B=2, H=4, D=64, n=2):
    """fla bf16 (the mixer's call: q/k l2norm in the kernel) vs the fp32 chunked reference on the same
    bf16-rounded inputs; relative RMS error of the output, final state and every gradient."""
    x = make_inputs(B, T, H, D, D, n, dtype=torch.float32, device='cuda', neg_eigval=neg_eigval, seed=T)
    raw = {key: (t.to(torch.bfloat16) if key in ('q', 'k', 'v', 'beta') else t) for key, t in x.items()}
    raw['q'] = (raw['q'].float() * 3).bfloat16()  # not unit norm: the kernel normalises
    raw['k'] = (raw['k'].float() * 0.5).bfloat16()

    def fla_fn(q, k, v, g, beta, initial_state, num_householder):
        return dp.fla_gated_delta_product(q, k, v, g, beta, D ** -0.5, initial_state=initial_state,
                                          output_final_state=True, num_householder=num_householder)

    def ref_fn(q, k, v, g, beta, initial_state, num_householder):
        return dp.chunk_gated_delta_product_ref(dp.l2norm(q.float()), dp.l2norm(k.float()), v.float(), g,
                                                beta.float(), D ** -0.5, initial_state=initial_state,
                                                num_householder=num_householder)

    got = run_with_grads(fla_fn, raw, n)
    want = run_with_grads(ref_fn, raw, n)
    return {key: rel_rms(got[key], want[key]) for key in want}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize('T', [63, 256, 1000, 4096])
def test_kernel_matches_reference(T):
    errs = kernel_vs_ref(T)
    assert set(errs) == {'o', 'final_state', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dinitial_state'}
    bad = {k: e for k, e in errs.items() if not e < 0.01}
    assert not bad, errs


@pytest.mark.cuda
@needs_cuda
def test_kernel_matches_reference_negative_eigenvalues():
    errs = kernel_vs_ref(256, neg_eigval=True)
    assert all(e < 0.01 for e in errs.values()), errs


@pytest.mark.cuda
@needs_cuda
def test_selfcheck_passes():
    results = dp.selfcheck()
    assert results and all(r['ok'] for r in results), results


def _fp32_step(m, idx):
    """Loss and gradients of a GPT in fp32, TF32 off: the reference the bf16 runs are measured against."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _, loss = m(idx, idx)
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return loss.item()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize('neg_eigval', [False, True], ids=['beta_0_1', 'neg_eigval'])
def test_cuda_mixer_fla_matches_torch_backend(neg_eigval):
    """The whole model, its mixers at unit scale (tests/helpers.py: at GPT-2's init the mixers barely move the
    residual stream, and the embedding and MLP gradients would hide theirs), on fla's kernel under bf16
    autocast, against the torch backend in fp32: the loss, and each mixer parameter's gradient no further from
    fp32 than FLOOR_RATIO = 2 times the torch backend's own distance under the same autocast, plus 1e-3.
    The bound is relative to that bf16 floor (FlashAttention's tests compare so) because bf16 rounding alone
    moves these gradients by 1-4% through two layers: a fixed 2e-2 failed on A_log in the second layer, where
    the torch backend under autocast is itself 2.6% from fp32 and the kernel 3.4%. The kernel's ratio measured
    on the H200 (results/cuda-tests/e4f0c43/diag_gdp.log, these models and inputs) is at most 1.31, 1.47
    with negative eigenvalues; a wrong gate, order or role is an O(1) error."""
    FLOOR_RATIO, ATOL = 2.0, 1e-3
    idx = torch.randint(0, 65, (4, 200), generator=torch.Generator().manual_seed(0)).cuda()
    models, losses = {}, {}
    for name, backend, bf16 in (('fla', 'fla', True), ('torch_bf16', 'torch', True), ('fp32', 'torch', False)):
        m = unit_scale_mixers_(tiny_model(torch.float32, backend=backend, allow_neg_eigval=neg_eigval,
                                          **GPU_SHAPES)).cuda().train()
        if bf16:
            with torch.autocast('cuda', dtype=torch.bfloat16):
                _, loss = m(idx, idx)
            loss.backward()
            losses[name] = loss.item()
        else:
            losses[name] = _fp32_step(m, idx)
        models[name] = m
    assert abs(losses['fla'] - losses['fp32']) <= FLOOR_RATIO * abs(losses['torch_bf16'] - losses['fp32']) + 1e-3
    kernel = mixer_grad_errors(models['fla'], models['fp32'], rel_rms)
    floor = mixer_grad_errors(models['torch_bf16'], models['fp32'], rel_rms)
    assert len(kernel) == 2 * len(list(models['fla'].transformer.h[0].mixer.parameters()))
    over = {n: (round(kernel[n], 4), round(floor[n], 4)) for n in kernel
            if not kernel[n] <= FLOOR_RATIO * floor[n] + ATOL}
    assert not over, f"(kernel, bf16 floor) over {FLOOR_RATIO}x the floor: {over}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize('prompt_len', [1, 63, 256])
def test_cuda_generate_cached_equals_uncached(prompt_len):
    """bf16 kernel prefill + fp32 decode steps vs bf16 kernel forwards: greedy tokens must agree, except
    that a divergence is allowed at a near tie (top-2 logit margin within bf16 noise)."""
    m = tiny_model(torch.float32, **GPU_SHAPES).cuda()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)  # sharper logits, so ties are rare
    idx = torch.randint(0, 65, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        a = m.generate(idx, 16, temperature=0, use_cache=True)
        b = m.generate(idx, 16, temperature=0, use_cache=False)
        if not torch.equal(a, b):
            t = (a != b).any(0).nonzero()[0].item()  # first position where they differ
            logits, _ = m(a[:, :t])
            top2 = logits[:, -1].float().topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1]).min().item()
            assert margin < 0.02 * logits.float().std().item(), (t, margin)


@pytest.mark.cuda
@needs_cuda
def test_cuda_prefill_and_steps_match_full_forward():
    m = tiny_model(torch.float32, **GPU_SHAPES).cuda()
    idx = torch.randint(0, 65, (2, 300), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        full, _ = m(idx)
        state = m.init_state(2, 300)
        parts = [m(idx[:, :200], state=state)[0], m(idx[:, 200:250], state=state)[0]]
        parts += [m(idx[:, t:t + 1], state=state)[0] for t in range(250, 300)]
    assert rel_rms(torch.cat(parts, 1).float(), full.float()) < 0.02


@pytest.mark.cuda
@needs_cuda
def test_cuda_missing_tilelang_gives_clear_error(monkeypatch):
    """With fla's TileLang backend switched off, exactly where fla's own gated backward would refuse
    (Hopper + Triton in [3.4.0, 3.7.1)), the mixer refuses up front with a message naming the fixes."""
    monkeypatch.setenv('FLA_TILELANG', '0')
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    affected = IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
    assert (fla_ops.gated_backward_problem() is not None) == affected
    if not affected:
        pytest.skip('fla gated backward works here without tilelang')
    from fla.ops.gated_delta_product import chunk_gated_delta_product
    x = make_inputs(1, 64, 4, 64, 64, 2, dtype=torch.bfloat16, device='cuda')
    q = x['q'].requires_grad_()
    o, _ = chunk_gated_delta_product(q, x['k'], x['v'], x['g'].float(), x['beta'], num_householder=2)
    with pytest.raises(RuntimeError, match='3.7.1'):  # fla's own refusal: our check agrees with it
        o.float().sum().backward()
    m = tiny_model(torch.float32, backend='fla', **GPU_SHAPES).cuda().train()
    idx = torch.randint(0, 65, (1, 64), device='cuda')
    with pytest.raises(RuntimeError, match='pip install tilelang'):
        m(idx, idx)
    with torch.no_grad():
        m(idx)  # inference needs no backward: fine
