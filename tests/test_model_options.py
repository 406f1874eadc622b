"""The skeleton's and vanilla attention's options: no MLP (the identity state mixer), embedding and attention
dropout, pos_emb 'rope', grouped-query attention (with its KV cache), head_dim, and the -100 ignored target."""
import pytest
import torch
import torch.nn.functional as F

import model as model_lib

V = 65


def tiny(model_type='vanilla', seed=0, **kw):
    """A tiny model in float64 and eval mode, re-initialised at unit scale (std 1/sqrt(fan_in)) so that the
    mixers dominate the residual stream and greedy decoding is not a near-tie (as at the 0.02 init)."""
    mod = model_lib.get_model_module(model_type)
    torch.manual_seed(seed)
    m = model_lib.build_model(model_type, **{**mod.TINY, **kw})
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return m.double().eval()


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- no MLP

@pytest.mark.parametrize('model_type', list(model_lib.MODEL_TYPES))
def test_no_mlp_is_the_identity_state_mixer(model_type):
    """mlp=False: each block adds ln_2(x) where the MLP's output would be (Zoology's Identity state mixer),
    the MLP's parameters are gone, and d_ff is not solved (the delta models default to d_ff=-1)."""
    with_mlp, without = tiny(model_type), tiny(model_type, mlp=False)
    mlp_params = sum(p.numel() for b in with_mlp.transformer.h for p in b.mlp.parameters())
    assert mlp_params > 0
    assert without.get_num_params(False) == with_mlp.get_num_params(False) - mlp_params
    blk = without.transformer.h[0]
    assert isinstance(blk.mlp, torch.nn.Identity) and not list(blk.mlp.parameters())
    assert without.config.d_ff == model_lib.get_model_module(model_type).GPTConfig().d_ff  # as given, not solved
    x = torch.randn(2, 16, without.config.n_embd, dtype=torch.float64)
    h = x + blk.mixer(blk.ln_1(x))
    torch.testing.assert_close(blk(x), h + blk.ln_2(h), rtol=1e-12, atol=1e-12)
    logits, _ = without(tokens(2, 16))
    assert logits.shape == (2, 16, V)


def test_no_mlp_does_not_solve_d_ff(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("solve_d_ff called for a model without MLP")
    monkeypatch.setattr(model_lib, 'solve_d_ff', boom)
    model_lib.build_model('delta', n_layer=2, n_embd=64, n_head=2, head_dim=32, mlp=False)
    with pytest.raises(AssertionError, match='solve_d_ff'):  # the patch is live: a model with MLP solves
        model_lib.build_model('delta', n_layer=2, n_embd=64, n_head=2, head_dim=32)
    with pytest.raises(ValueError, match='mlp=False'):
        model_lib.build_model('vanilla', d_ff=256, mlp=False)


# ----------------------------------------------------------------------------- dropout options

def _train_out(m, seed, idx):
    torch.manual_seed(seed)
    return m(idx)[0]


def test_attn_and_embd_dropout_defaults_are_dropout():
    """attn_dropout / embd_dropout < 0 (the defaults) are `dropout`: the same draws, bit for bit, as setting
    them to it; each key switches its own dropout only."""
    idx = tokens(2, 32)
    base = tiny(dropout=0.3).train()
    same = tiny(dropout=0.3, attn_dropout=0.3, embd_dropout=0.3).train()
    assert base.transformer.h[0].mixer.dropout == 0.3 and base.transformer.drop.p == 0.3
    assert torch.equal(_train_out(base, 1, idx), _train_out(same, 1, idx))
    off = tiny(dropout=0.3, attn_dropout=0.0, embd_dropout=0.0).train()
    assert off.transformer.h[0].mixer.dropout == 0.0 and off.transformer.drop.p == 0.0
    assert not torch.equal(_train_out(base, 1, idx), _train_out(off, 1, idx))
    # only attention dropout on: training forwards differ between seeds, eval is deterministic
    attn_only = tiny(dropout=0.0, attn_dropout=0.5).train()
    assert attn_only.transformer.drop.p == 0.0 and attn_only.transformer.h[0].mixer.resid_dropout.p == 0.0
    assert not torch.equal(_train_out(attn_only, 1, idx), _train_out(attn_only, 2, idx))
    embd_only = tiny(dropout=0.0, embd_dropout=0.5).train()
    assert embd_only.transformer.h[0].mixer.dropout == 0.0
    assert not torch.equal(_train_out(embd_only, 1, idx), _train_out(embd_only, 2, idx))
    attn_only.eval()
    assert torch.equal(attn_only(idx)[0], attn_only(idx)[0])


def test_attn_dropout_is_vanillas_key_only():
    with pytest.raises(ValueError, match='attn_dropout'):
        model_lib.build_model('delta', attn_dropout=0.1)


# ----------------------------------------------------------------------------- positions, GQA

def test_pos_emb_choices():
    m = tiny(pos_emb='rope')
    assert m.transformer.wpe is None and m.max_context is None
    assert m.get_num_params(False) == tiny().get_num_params(False) - tiny().transformer.wpe.weight.numel()
    with pytest.raises(ValueError, match="'learned', 'none', 'rope'"):
        model_lib.build_model('vanilla', pos_emb='alibi')
    for mt in ('delta', 'delta_product', 'nsa'):  # RoPE is vanilla attention's; the others say so
        with pytest.raises(ValueError, match="'rope' is vanilla attention's"):
            model_lib.build_model(mt, **{**model_lib.get_model_module(mt).TINY, 'pos_emb': 'rope'})


def test_rope_attention_is_relative():
    """The RoPE vanilla attention uses (model.rotary, NSA's too) makes q . k depend on the offset only."""
    mx = tiny(pos_emb='rope', n_head=4).transformer.h[0].mixer
    assert mx.rope_theta == 10000.0
    q, k = torch.randn(1, 1, 1, mx.head_dim, dtype=torch.float64), torch.randn(1, 1, 1, mx.head_dim, dtype=torch.float64)
    s1 = (model_lib.rotary(q, 30) * model_lib.rotary(k, 20)).sum()
    s2 = (model_lib.rotary(q, 130) * model_lib.rotary(k, 120)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(s1, (q * k).sum())


def reference_attention(mx, x):
    """The mixer's function written out: q, k, v from c_attn, RoPE, each K/V head repeated for its group of
    query heads, causal softmax, c_proj."""
    B, T, C = x.shape
    H, Hkv, D = mx.n_head, mx.n_kv_head, mx.head_dim
    q, k, v = mx.c_attn(x).split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    if mx.rope_theta is not None:
        q, k = model_lib.rotary(q, 0, mx.rope_theta), model_lib.rotary(k, 0, mx.rope_theta)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)  # head h reads kv head h // G
    s = torch.einsum('bihd,bjhd->bhij', q, k) / D ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf'))
    y = torch.einsum('bhij,bjhd->bihd', s.softmax(-1), v).reshape(B, T, H * D)
    return mx.c_proj(y)


@pytest.mark.parametrize('kw', [dict(), dict(n_kv_head=2), dict(n_kv_head=1, pos_emb='rope'),
                                dict(n_head=8, n_kv_head=1, head_dim=16, pos_emb='rope')])
def test_attention_equals_its_formula(kw):
    mx = tiny(**{'n_head': 4, **kw}).transformer.h[0].mixer
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    torch.testing.assert_close(mx(x), reference_attention(mx, x), rtol=1e-10, atol=1e-10)


def test_gqa_layout_and_errors():
    m = tiny(n_head=4, n_kv_head=1, pos_emb='rope')
    mx = m.transformer.h[0].mixer
    assert mx.c_attn.weight.shape == ((4 + 2) * 16, 64) and mx.c_proj.weight.shape == (64, 4 * 16)
    st = m.init_state(3, 40)
    assert st.layers[0]['k'].shape == (3, 1, 40, 16)  # the cache holds the K/V heads only
    assert m.decode_state_bytes(1, 1024) * 4 == tiny(n_head=4, pos_emb='rope').decode_state_bytes(1, 1024)
    with pytest.raises(ValueError, match=r'valid n_kv_head: 0 \(= n_head\), \[1, 2, 4\]'):
        model_lib.build_model('vanilla', n_head=4, n_kv_head=3)
    # the bake-off's control: vanilla in NSA's layout (16 query heads of 32 on 1 KV head, RoPE), matched
    c = model_lib.build_model('vanilla', n_head=16, n_kv_head=1, head_dim=32, pos_emb='rope', d_ff=-1)
    assert c.transformer.h[0].mixer.c_attn.weight.shape == (18 * 32, 384)
    assert abs(c.get_num_params(False) / 10_745_088 - 1) < 0.01, c.get_num_params(False)


@pytest.mark.parametrize('kw', [dict(n_head=4, n_kv_head=1, pos_emb='rope'), dict(n_head=4, n_kv_head=2),
                                dict(n_head=4, pos_emb='rope')])
def test_cached_decoding_equals_full_forward_gqa_rope(kw):
    """Prefill, one-token steps (int pos and the static tensor pos a CUDA graph replays), then a multi-token
    continuation, against one full forward: GQA's cache and RoPE's positions line up."""
    m = tiny(**kw)
    T = 40
    idx = tokens(2, T, seed=3)
    with torch.no_grad():
        full, _ = m(idx)
        st = m.init_state(2, T)
        parts = [m(idx[:, :15], state=st)[0]]
        parts += [m(idx[:, t:t + 1], state=st)[0] for t in range(15, 20)]
        for t in range(20, 25):
            parts.append(m(idx[:, t:t + 1], state=st, static_pos=torch.tensor(st.pos))[0])
        parts.append(m(idx[:, 25:], state=st)[0])
    assert st.pos == T
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


def test_rope_generates_past_block_size_with_and_without_cache():
    m = tiny(n_head=4, n_kv_head=2, pos_emb='rope')
    idx = tokens(2, 50, seed=4)
    a = m.generate(idx, 30, temperature=0, use_cache=True)    # 80 > block_size 64: nothing is cropped
    b = m.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 80)
    assert len(set(a[:, 50:].flatten().tolist())) > 2


def test_head_dim_zero_means_n_embd_over_n_head():
    m = model_lib.build_model('delta', n_layer=1, n_embd=96, n_head=3, head_dim=0)
    assert m.config.head_dim == 32 and m.transformer.h[0].mixer.head_dim == 32
    assert tiny().transformer.h[0].mixer.head_dim == 16  # vanilla's TINY: 64 / 4
    with pytest.raises(ValueError, match='divisible'):
        model_lib.build_model('delta', n_embd=100, n_head=3, head_dim=0)


# ----------------------------------------------------------------------------- ignored targets

def test_loss_ignores_minus_100():
    m = tiny()
    idx = tokens(2, 24)
    tgt = tokens(2, 24, seed=9)
    tgt[:, ::3] = -100
    logits, loss = m(idx, tgt)
    keep = tgt != -100
    want = F.cross_entropy(logits[keep].float(), tgt[keep])  # forward computes the loss in fp32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
