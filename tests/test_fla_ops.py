"""fla_ops: fla's kernels as custom ops. On CUDA: outputs and every gradient equal the direct fla call bit for
bit, torch.library.opcheck accepts each op (fake shapes, schema, autograd), and torch.compile traces each
compiled model's training step as one graph (torch._dynamo.explain). On CPU: the ops are registered without
importing fla."""
import sys

import pytest
import torch

import fla_ops
import model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (fla\'s Triton kernels)')
# fla autotunes each kernel on its first call per (heads, head dim, flags): 30-110 s each on the H200. The op
# tests use the heads and head size of the compiled models below (SMALL: 2 heads of 64), so that those
# models' steps find their kernels tuned (the comparisons are bit for bit: the shape loosens nothing).
SMALL_HEADS = 2


def test_ops_register_without_fla():
    """Importing fla_ops (every model file does) registers the ops and imports neither fla nor triton."""
    for op in ('chunk_delta_rule_fwd', 'chunk_gated_delta_product_bwd', 'causal_conv1d_silu_fwd', 'causal_conv1d_silu_bwd'):
        assert hasattr(torch.ops.bakeoff, op), op
    if not torch.cuda.is_available():
        assert 'fla.ops' not in sys.modules


def test_missing_fla_names_the_fix():
    """An op run without fla (or Triton) says what to install and what runs without it."""
    with pytest.raises(ImportError, match=r"pip install fla-core.*backend='torch'"):
        fla_ops.import_fla('no_such_module_here', 'anything')


def _inputs(B, T, H, K, V, n=1, gated=False, h0=False, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device='cuda', generator=g).to(dt)  # noqa: E731
    x = dict(q=r(B, T, H, K), k=r(B, T * n, H, K), v=r(B, T * n, H, V),
             beta=torch.rand(B, T * n, H, device='cuda', generator=g).to(torch.bfloat16))
    if gated:
        x['g'] = -torch.rand(B, T, H, device='cuda', generator=g)  # log decay, fp32
    if h0:
        x['h0'] = r(B, H, K, V, dt=torch.float32)
    return {k: t.requires_grad_() for k, t in x.items()}


def _run(fn, x, do, dht, autocast=False):
    """fn(x) -> (o, ht); o and ht, and the gradient of <o, do> + <ht, dht> for every input; the forward
    under bf16 autocast if asked (as the models run it; fla's backward then re-enters it)."""
    xs = {k: t.detach().clone().requires_grad_() for k, t in x.items()}
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        o, ht = fn(xs)
    loss = (o.float() * do).sum() + ((ht * dht).sum() if dht is not None else 0)
    loss.backward()
    return {'o': o, 'ht': ht, **{f'd{k}': t.grad for k, t in xs.items()}}


def _assert_bitwise(got, want):
    for name in want:
        a, b = got[name], want[name]
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [63, 256])
@pytest.mark.parametrize('h0,autocast', [(False, False), (True, False), (False, True)])
def test_chunk_delta_rule_op_is_fla_bitwise(T, h0, autocast):
    from fla.ops.delta_rule import chunk_delta_rule
    B, H, D = 2, SMALL_HEADS, 64
    x = _inputs(B, T, H, D, D, h0=h0, seed=T)
    do = torch.randn(B, T, H, D, device='cuda')
    dht = torch.randn(B, H, D, D, device='cuda') if h0 else None
    direct = lambda a: chunk_delta_rule(a['q'], a['k'], a['v'], a['beta'], scale=D ** -0.5,  # noqa: E731
                                        initial_state=a.get('h0'), output_final_state=h0,
                                        use_qk_l2norm_in_kernel=True)
    op = lambda a: fla_ops.chunk_delta_rule(a['q'], a['k'], a['v'], a['beta'], D ** -0.5, a.get('h0'), h0)  # noqa: E731
    _assert_bitwise(_run(op, x, do, dht, autocast), _run(direct, x, do, dht, autocast))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [63, 256])
@pytest.mark.parametrize('gated,h0', [(True, False), (True, True), (False, False)])
def test_chunk_gated_delta_product_op_is_fla_bitwise(T, gated, h0):
    from fla.ops.gated_delta_product import chunk_gated_delta_product
    if gated and fla_ops.gated_backward_problem():
        pytest.skip(fla_ops.gated_backward_problem())
    B, H, D, n = 2, SMALL_HEADS, 64, 2
    x = _inputs(B, T, H, D, D, n=n, gated=gated, h0=h0, seed=T)
    do = torch.randn(B, T, H, D, device='cuda')
    dht = torch.randn(B, H, D, D, device='cuda') if h0 else None
    direct = lambda a: chunk_gated_delta_product(  # noqa: E731
        q=a['q'], k=a['k'], v=a['v'], g=a.get('g'), beta=a['beta'], num_householder=n, scale=D ** -0.5,
        initial_state=a.get('h0'), output_final_state=h0, use_qk_l2norm_in_kernel=True)
    op = lambda a: fla_ops.chunk_gated_delta_product(a['q'], a['k'], a['v'], a.get('g'), a['beta'],  # noqa: E731
                                                    D ** -0.5, n, a.get('h0'), h0)
    _assert_bitwise(_run(op, x, do, dht), _run(direct, x, do, dht))


def _conv_inputs(B, T, C, K, seed):
    """x as the models pass it, a strided view: the first C channels of a wider matmul output (B, T, C + 6)."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    return dict(wide=torch.randn(B, T, C + 6, device='cuda', generator=g).to(torch.bfloat16),
                w=torch.randn(C, K, device='cuda', generator=g) / K)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('T', [63, 256])
def test_causal_conv1d_op_is_fla_bitwise(T):
    """The short conv's op against fla's causal_conv1d(activation='silu'): the output, dx and dw, on a
    strided x (a slice of a wider matmul's output) under bf16 autocast, as DeltaNet's fused q, k, v conv calls it."""
    from fla.modules.causal_conv1d import causal_conv1d
    B, C, K = 2, 384, 4
    x = _conv_inputs(B, T, C, K, seed=T)
    dy = torch.randn(B, T, C, device='cuda')

    def run(fn):
        wide, w = x['wide'].clone().requires_grad_(), x['w'].clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = fn(wide[..., :C], w)
        (y.float() * dy).sum().backward()
        return {'o': y, 'dx': wide.grad, 'dw': w.grad}

    _assert_bitwise(run(fla_ops.causal_conv1d_silu), run(lambda a, w: causal_conv1d(a, w, activation='silu')[0]))


@cuda
@pytest.mark.cuda
def test_opcheck():
    """torch.library.opcheck: the fake implementations' shapes, dtypes and strides against the kernels', the
    schemas, and the autograd registrations (forward op with its backward op)."""
    D = 64
    x = _inputs(2, 100, SMALL_HEADS, D, D, h0=True)
    torch.library.opcheck(torch.ops.bakeoff.chunk_delta_rule_fwd.default,
                          (x['q'], x['k'], x['v'], x['beta'], x['h0'], D ** -0.5, True))
    gated = not fla_ops.gated_backward_problem()
    y = _inputs(2, 100, SMALL_HEADS, D, D, n=2, gated=gated, h0=True)
    torch.library.opcheck(torch.ops.bakeoff.chunk_gated_delta_product_fwd.default,
                          (y['q'], y['k'], y['v'], y.get('g'), y['beta'], y['h0'], D ** -0.5, 2, True))
    c = _conv_inputs(2, 100, 384, 4, seed=1)  # 384 channels: the compiled DeltaNet's q, k, v conv (its autotune key)
    torch.library.opcheck(torch.ops.bakeoff.causal_conv1d_silu_fwd.default,
                          (c['wide'].requires_grad_()[..., :384], c['w'].requires_grad_()))


SMALL = dict(n_layer=2, n_embd=128, n_head=SMALL_HEADS, block_size=128, vocab_size=65, dropout=0.1)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('model_type', ['vanilla', 'delta', 'delta_product'])
def test_compiled_training_step_has_no_graph_breaks(model_type):
    """The training step's forward and loss as torch.compile sees it (autocast bf16, dropout on): one graph,
    no breaks; AOTAutograd then builds the backward from the ops' registered backwards. NSA is not compiled
    (model_nsa.GPT.compile_problem)."""
    mod = model.get_model_module(model_type)
    kw = dict(SMALL, d_ff=256) if model_type != 'vanilla' else dict(SMALL)
    if model_type == 'delta_product' and fla_ops.gated_backward_problem():
        pytest.skip(fla_ops.gated_backward_problem())
    m = mod.GPT(mod.GPTConfig(**kw)).cuda().train()
    idx = torch.randint(0, 65, (4, 128), device='cuda')
    torch._dynamo.reset()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(m)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize('model_type', ['delta', 'delta_product'])
def test_compiled_training_step_equals_eager(model_type):
    """The compiled training step, fla's kernels as custom ops inside one Inductor graph, against the same step
    run eagerly (the same ops, launched one by one): the loss and every parameter's gradient, dropout off.
    Not bit for bit: Inductor fuses the elementwise chains around the kernels and rounds to bf16 once per
    chain, where eager rounds after each op; the bounds are at that rounding's scale."""
    mod = model.get_model_module(model_type)
    if model_type == 'delta_product' and fla_ops.gated_backward_problem():
        pytest.skip(fla_ops.gated_backward_problem())
    torch.manual_seed(0)
    m = mod.GPT(mod.GPTConfig(**dict(SMALL, d_ff=256, dropout=0.0))).cuda().train()
    idx = torch.randint(0, 65, (4, 128), device='cuda', generator=torch.Generator(device='cuda').manual_seed(1))

    def step(fn):
        m.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = fn(idx, idx)
        loss.backward()
        return loss.item(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    eager_loss, eager = step(m)
    torch._dynamo.reset()
    compiled_loss, compiled = step(torch.compile(m))
    torch._dynamo.reset()
    assert abs(compiled_loss - eager_loss) < 1e-3 * abs(eager_loss), (compiled_loss, eager_loss)
    worst = {n: model.rel_rms(compiled[n], eager[n]) for n in eager}
    assert max(worst.values()) < 2e-2, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
