"""Planted bugs: each one a small, realistic mistake in one mixer, put in by monkeypatching the module it
lives in (the model files stay clean). `PLANT=<name> python -m pytest ...` runs the tests with it (conftest.py
calls plant() before collection); tests/test_planted.py checks that each one makes the tests it names fail,
and that those tests pass without it. A bug no test catches is a missing test.

Each entry: what the bug is, and the tests meant to catch it (pytest node ids, CPU and CUDA)."""

import types

import torch
from torch.nn import functional as F


class _Proxy(types.ModuleType):
    """A stand-in for a module (torch, torch.nn.functional) in one model file's namespace: the names given
    are replaced, every other attribute is the real module's."""

    def __init__(self, real, **replaced):
        super().__init__(real.__name__)
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _delta_qk_swap():
    """DeltaNet reads its memory with the key and writes with the query: q and k swapped after the convs."""
    import model_delta as md
    orig = md.fused_short_conv

    def swapped(x, convs, cache=None, fla=False):
        y = orig(x, convs, cache, fla)
        n = convs[0].weight.size(0)
        return torch.cat([y[..., n:2 * n], y[..., :n], y[..., 2 * n:]], dim=-1)
    md.fused_short_conv = swapped


def _delta_beta_no_sigmoid():
    """DeltaNet's write strength beta = b_proj(x) itself, its sigmoid dropped."""
    import model_delta as md
    md.torch = _Proxy(torch, sigmoid=lambda x: x)


def _nsa_window_shift():
    """NSA's sliding window one token late: keys t-w .. t-1 instead of t-w+1 .. t (the whole-sequence
    reference; the decoding path and the kernels keep the right window)."""
    import model_nsa as M

    def shifted(q, k, v, window_size, scale):
        j = torch.arange(q.size(1), device=q.device)
        i = j[:, None] - 1
        mask = (j[None, :] <= i) & (j[None, :] > i - window_size)
        return M.masked_attention(q, k, v, mask[None, :, None, :], scale)[0]
    M.sliding_window_attention = shifted


def _gdp_householder_reversed():
    """Gated DeltaProduct applies each token's n_h Householder steps in reverse order (the PyTorch
    references and the decoding step; fla's kernel keeps the right order)."""
    import model_delta_product as dp

    def flip_sub_steps(k, v, beta, T, n):  # (B, T*n, ...) -> each token's n sub-steps reversed
        f = lambda x: x.reshape(x.size(0), T, n, *x.shape[2:]).flip(2).reshape(x.shape)
        return f(k), f(v), f(beta)

    def wrap_full(orig):
        def fn(q, k, v, g, beta, *a, num_householder=1, **kw):
            k, v, beta = flip_sub_steps(k, v, beta, q.size(1), num_householder)
            return orig(q, k, v, g, beta, *a, num_householder=num_householder, **kw)
        return fn
    dp.naive_recurrent_gated_delta_product = wrap_full(dp.naive_recurrent_gated_delta_product)
    dp.chunk_gated_delta_product_ref = wrap_full(dp.chunk_gated_delta_product_ref)
    step = dp.gated_delta_product_step
    dp.gated_delta_product_step = lambda S, q, k, v, g, beta, scale: step(S, q, k.flip(1), v.flip(1), g,
                                                                         beta.flip(1), scale)


def _vanilla_causal_off_by_one():
    """Vanilla attention's causal mask lets each query see one token ahead (keys <= t + 1)."""
    import model

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if is_causal:
            T, S = q.size(-2), k.size(-2)
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kw)
    model.F = _Proxy(F, scaled_dot_product_attention=sdpa)


# name -> (plant function, CPU tests that must catch it, CUDA tests that must catch it). The CPU lists are
# small on purpose: test_planted runs each in a subprocess, within a minute in all on two cores.
PLANTS = {
    'delta_qk_swap': (_delta_qk_swap,
                      ['tests/test_delta.py::test_mixer_equals_its_layers_one_by_one'],
                      ['tests/test_fla_layers.py::test_delta_net_equals_fla_layer']),
    'delta_beta_no_sigmoid': (_delta_beta_no_sigmoid,
                              ['tests/test_delta.py::test_mixer_equals_its_layers_one_by_one'],
                              ['tests/test_fla_layers.py::test_delta_net_equals_fla_layer']),
    'nsa_window_shift': (_nsa_window_shift,
                         ['tests/test_nsa.py::test_window_branch_matches_loop'],
                         ['tests/test_fla_layers.py::test_nsa_equals_fla_layer',
                          'tests/test_nsa.py::test_train_step_cuda_matches_torch_backend']),
    'gdp_householder_reversed': (_gdp_householder_reversed,
                                 ['tests/test_delta_product.py::test_refs_match_paper_formula'],
                                 ['tests/test_delta_product.py::test_kernel_matches_reference',
                                  'tests/test_fla_layers.py::test_gated_delta_product_equals_fla_layer']),
    'vanilla_causal_off_by_one': (_vanilla_causal_off_by_one,
                                  ['tests/test_model.py::test_future_tokens_dont_change_past_logits[vanilla]'],
                                  []),  # no CUDA-only path: SDPA is the same call on every device
}


def plant(name):
    """Put bug `name` in (for the rest of the process). An unknown name raises, naming the valid ones."""
    if name not in PLANTS:
        raise ValueError(f"unknown planted bug {name!r}; valid: {', '.join(PLANTS)}")
    PLANTS[name][0]()
