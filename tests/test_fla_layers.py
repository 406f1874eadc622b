"""Each mixer against fla's own layer (CUDA): fla.layers.DeltaNet, GatedDeltaProduct and NativeSparseAttention
(flash-linear-attention 0.6.0, the package of fla's layers; fla-core has the kernels only), built with the
options that match the mixer's config, given the mixer's weights (names and layouts mapped below), and
compared on the same input: the output, the input's gradient and every parameter's gradient, at T = 63 and 256.

Both sides run under bf16 autocast, the way training runs: the projections are bf16 matmuls on both sides,
and our mixer runs its exact PyTorch reference (backend='torch', fp32 inside) where fla's layer runs its
kernels. So what differs is the kernels' own bf16 arithmetic, which their tests bound at 1e-2 relative RMS
(output and input gradient: TOL); parameter gradients sum those errors over the B x T tokens, where they
can partly cancel (the 1-D A_log, dt_bias and norm weights are such sums): PARAM_TOL. A weight in the
wrong role, a wrong layout, gate, norm, scale or window is an O(1) difference.

What is not meant to match, by design: the initialisation (our mixers' own: A_log from U[1, 16] where fla's
layer draws U[0, 16]; the weights are copied anyway), our fused projections and convs (the separate layers'
function, tested on CPU), and NSA's top-k decision on near-tied blocks, where bf16 rounding may flip the
kernel's choice (tests/test_nsa.py::test_kernel_full_path bounds how often and shows each is such a flip):
the reference here is given the blocks fla's layer chose, and the share of rows whose choice differs from
the reference's own is asserted small."""

import pytest
import torch

import fla_ops
import model_delta as md
import model_delta_product as dp
import model_nsa as M
from helpers import unit_scale_

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

TOL = 1e-2        # output and input gradient: the kernels' bf16 tolerance
PARAM_TOL = 2e-2  # parameter gradients: those errors summed over all tokens
B, C = 2, 256     # batch and model width: one shape for all, few autotuning runs
T_VALUES = [63, 256]


@pytest.fixture(scope='module')
def fla_layers():
    try:
        import fla.layers
    except Exception as e:  # ImportError, or an optional dependency of fla's layers failing to load
        pytest.skip(f"fla.layers does not import ({type(e).__name__}: {e}): fla's layers are the "
                    f"flash-linear-attention package, `pip install flash-linear-attention==0.6.0` next to fla-core")
    return fla.layers


@pytest.fixture(autouse=True)
def true_fp32():
    """Our side's fp32 reference in real fp32 (train() turns TF32 on for the whole process)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def copy_weights(ours, theirs, names):
    """theirs' parameters := ours', by {our name: their name}. Both sides must be covered entirely, so no
    weight is left at fla's initialisation and none of ours is unmapped."""
    mine, fla = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(names) == set(mine), f"unmapped parameters of ours: {sorted(set(mine) - set(names))}"
    assert set(names.values()) == set(fla), f"unmapped parameters of fla's: {sorted(set(fla) - set(names.values()))}"
    with torch.no_grad():
        for a, b in names.items():
            assert mine[a].shape == fla[b].shape, (a, tuple(mine[a].shape), b, tuple(fla[b].shape))
            fla[b].copy_(mine[a])


def fwd_bwd(module, x, dy):
    """Output, input gradient and {name: gradient} of module(x) under bf16 autocast, loss <y, dy>."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y  # fla's layers return (o, attentions, cache)
    (y.float() * dy).sum().backward()
    return y.detach().float(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def measure(ours, theirs, names, T, seed):
    """Run fla's layer, then ours, on one input. Returns ({what: rel RMS error}, {what: error over its
    tolerance}) for the output, the input gradient and each mapped parameter's gradient."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    x = torch.randn(B, T, C, device='cuda', generator=g)
    dy = torch.randn(B, T, C, device='cuda', generator=g)
    y_b, dx_b, dp_b = fwd_bwd(theirs, x, dy)
    y_a, dx_a, dp_a = fwd_bwd(ours, x, dy)
    errs = {'output': md.rel_rms(y_b, y_a), 'dx': md.rel_rms(dx_b, dx_a)}
    bad = {k: e for k, e in errs.items() if not e < TOL}
    for a, b in names.items():
        assert dp_b[b] is not None, f"fla's {b} got no gradient"
        errs[a] = md.rel_rms(dp_b[b], dp_a[a])
        if not errs[a] < PARAM_TOL:
            bad[a] = errs[a]
    return errs, bad


def compare(ours, theirs, names, T, seed):
    errs, bad = measure(ours, theirs, names, T, seed)
    assert not bad, f"T={T}: over tolerance {bad}; all: {errs}"


# ----------------------------------------------------------------------------- DeltaNet

DELTA_NAMES = {
    'q_proj.weight': 'q_proj.weight', 'k_proj.weight': 'k_proj.weight', 'v_proj.weight': 'v_proj.weight',
    'b_proj.weight': 'b_proj.weight',
    'q_conv.weight': 'q_conv1d.weight', 'k_conv.weight': 'k_conv1d.weight', 'v_conv.weight': 'v_conv1d.weight',
    'o_norm.weight': 'o_norm.weight', 'c_proj.weight': 'o_proj.weight',
}


@pytest.mark.parametrize('T', T_VALUES)
def test_delta_net_equals_fla_layer(fla_layers, T):
    """DeltaNet: fla's layer in chunk mode (it switches to its fused_recurrent kernel itself for T <= 64, so
    T = 63 checks that kernel), q/k SiLU convs and in-kernel L2 norm, sigmoid beta without the x2 of
    allow_neg_eigval, no output gate (a per-head RMSNorm), default scale Dk^-0.5, no biases anywhere."""
    cfg = md.GPTConfig(n_embd=C, n_head=4, head_dim=64, conv_size=4, bias=False, backend='torch')
    torch.manual_seed(0)
    ours = md.DeltaNetMixer(cfg).cuda()
    unit_scale_(ours, seed=1)
    theirs = fla_layers.DeltaNet(mode='chunk', hidden_size=C, expand_k=cfg.n_head * cfg.head_dim / C,
                                 expand_v=cfg.n_head * cfg.head_dim / C, num_heads=cfg.n_head, use_beta=True,
                                 use_gate=False, use_short_conv=True, conv_size=cfg.conv_size, conv_bias=False,
                                 allow_neg_eigval=False, qk_activation='silu', qk_norm='l2',
                                 norm_eps=ours.o_norm.eps).cuda()
    assert (theirs.head_k_dim, theirs.head_v_dim) == (cfg.head_dim, cfg.head_dim)
    copy_weights(ours, theirs, DELTA_NAMES)
    compare(ours, theirs, DELTA_NAMES, T, seed=T)


# ----------------------------------------------------------------------------- Gated DeltaProduct

GDP_NAMES = {
    'q_proj.weight': 'q_proj.weight', 'k_proj.weight': 'k_proj.weight', 'v_proj.weight': 'v_proj.weight',
    'b_proj.weight': 'b_proj.weight', 'a_proj.weight': 'a_proj.weight', 'A_log': 'A_log', 'dt_bias': 'dt_bias',
    'q_conv.weight': 'q_conv1d.weight', 'k_conv.weight': 'k_conv1d.weight', 'v_conv.weight': 'v_conv1d.weight',
    'g_proj.weight': 'g_proj.weight', 'o_norm.weight': 'o_norm.weight', 'c_proj.weight': 'o_proj.weight',
}


@pytest.mark.parametrize('T', T_VALUES)
def test_gated_delta_product_equals_fla_layer(fla_layers, T):
    """Gated DeltaProduct: fla's layer with our widths (head_dim 64, expand_v 1: fla's defaults 256 and 2
    ignore the model width), 2 Householder steps, the forget gate, the SiLU output gate with its fused
    RMSNorm, and allow_neg_eigval=False as in our config (fla's default is True). The k, v, beta layouts
    ((n h d), (n h)) are fla's, so the weights copy as they are."""
    problem = fla_ops.gated_backward_problem()
    if problem:
        pytest.skip(problem)
    cfg = dp.GPTConfig(n_embd=C, n_head=4, head_dim=64, expand_v=1.0, num_householder=2, allow_neg_eigval=False,
                       conv_size=4, bias=False, backend='torch')
    torch.manual_seed(0)
    ours = dp.GatedDeltaProductMixer(cfg).cuda()
    unit_scale_(ours, seed=2)
    theirs = fla_layers.GatedDeltaProduct(hidden_size=C, expand_v=cfg.expand_v, head_dim=cfg.head_dim,
                                          num_heads=cfg.n_head, num_v_heads=None, mode='chunk',
                                          use_output_gate=True, use_short_conv=True, conv_size=cfg.conv_size,
                                          conv_bias=False, norm_eps=ours.o_norm.eps, use_forget_gate=True,
                                          allow_neg_eigval=cfg.allow_neg_eigval,
                                          num_householder=cfg.num_householder).cuda()
    copy_weights(ours, theirs, GDP_NAMES)
    compare(ours, theirs, GDP_NAMES, T, seed=T)


# ----------------------------------------------------------------------------- NSA

NSA_NAMES = {'q_proj.weight': 'q_proj.weight', 'k_proj.weight': 'k_proj.weight', 'v_proj.weight': 'v_proj.weight',
             'g_proj.weight': 'g_proj.weight', 'c_proj.weight': 'o_proj.weight'}


@pytest.mark.parametrize('T', T_VALUES)
def test_nsa_equals_fla_layer(fla_layers, T, monkeypatch):
    """NSA: fla's NativeSparseAttention with our bake-off shapes (16 query heads on 1 KV head of 32, blocks
    of 32, 4 selected, window 64), RoPE base 10000 in the GPT-NeoX layout on both sides (fla's tables are in
    the activations' dtype, bf16 here: a rounding difference), the three sigmoid gates from one projection in
    the (h three) layout, no biases. Both share one K/V across the three branches (the paper has one per
    branch); that is the function here on both sides.
    fla's layer runs its window branch only through flash-attn; where flash-attn is not installed, its call
    is answered by fla's own parallel_attn with the same keys (t-w+1 .. t, the default scale).
    T = 63: two blocks, all of them forced, so there is no top-k choice; T = 256: one free slot of four."""
    import fla.layers.nsa as fla_nsa_layer
    import fla.ops.nsa.parallel as fla_nsa
    if fla_nsa.flash_attn_func is None:
        from fla.ops.attn.parallel import parallel_attn

        def window_by_parallel_attn(q, k, v, causal, window_size):
            assert causal and window_size[1] == 0, window_size
            return parallel_attn(q, k, v, window_size=window_size[0] + 1)
        monkeypatch.setattr(fla_nsa, 'flash_attn_func', window_by_parallel_attn)

    cfg = M.GPTConfig(n_embd=C, n_head=16, n_kv_head=1, head_dim=32, nsa_block_size=32, nsa_block_counts=4,
                      nsa_window_size=64, bias=False, backend='torch')
    torch.manual_seed(0)
    ours = M.NSAMixer(cfg).cuda()
    unit_scale_(ours, seed=3)  # attention logits of std ~1, as in the kernel tests whose tolerance TOL is
    theirs = fla_layers.NativeSparseAttention(hidden_size=C, num_heads=cfg.n_head, num_kv_heads=cfg.n_kv_head,
                                              head_dim=cfg.head_dim, qkv_bias=False, block_size=cfg.nsa_block_size,
                                              block_counts=cfg.nsa_block_counts, window_size=cfg.nsa_window_size,
                                              rope_theta=cfg.rope_theta).cuda()
    copy_weights(ours, theirs, NSA_NAMES)

    # the blocks fla's layer picks: its own top-k kernels on the q, k, v it hands parallel_nsa
    chosen, own = [], []
    real_parallel_nsa = fla_nsa_layer.parallel_nsa

    def spy(q, k, v, **kw):
        chosen.append(M.fla_block_indices(q.detach(), k.detach(), v.detach(), kw['block_size'], kw['block_counts'],
                                          q.size(-1) ** -0.5).long()[..., :cfg.nsa_block_counts])
        return real_parallel_nsa(q=q, k=k, v=v, **kw)
    monkeypatch.setattr(fla_nsa_layer, 'parallel_nsa', spy)
    # our reference: its own choice recorded, fla's (just made on the same input: fla's layer runs first) used
    real_select = M.select_blocks

    def given_fla_choice(*a, **kw):
        own.append(real_select(*a, **kw))
        assert own[-1].shape == chosen[-1].shape, (own[-1].shape, chosen[-1].shape)
        return chosen[-1]
    monkeypatch.setattr(M, 'select_blocks', given_fla_choice)
    errs, bad = measure(ours, theirs, NSA_NAMES, T, seed=T)
    assert len(chosen) == len(own) == 1
    differs = M.selection_diff(chosen[0], own[0]).float().mean().item()
    if T == 63:
        assert differs == 0  # two blocks, both forced: no choice to make
    assert differs < 0.02, f"fla's layer and our reference choose different blocks on {100 * differs:.1f}% of rows"
    assert not bad, f"T={T}: over tolerance {bad}; all: {errs}; choice differs on {100 * differs:.2f}% of rows"
