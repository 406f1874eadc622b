"""Properties every model must have, whatever its mixer: the decoding cache computes the same function
as the full forward, batch rows don't interact, the future doesn't leak, and parameters are matched."""
import functools
import math
import os
import shutil

import pytest
import torch

import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_TYPES = list(model_lib.MODEL_TYPES)
VANILLA_PARAMS = 10_745_088


def tiny(model_type, **kw):
    """A tiny model in float64: greedy decoding of a random-init model compares near-tied logits, and
    float64 keeps rounding differences between equivalent code paths far below any real gap."""
    mod = model_lib.get_model_module(model_type)
    torch.manual_seed(0)
    m = model_lib.build_model(model_type, **{**mod.TINY, **kw})
    return m.double().eval()


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_parameter_matching(model_type):
    n = model_lib.build_model(model_type).get_num_params(non_embedding=False)
    if model_type == 'vanilla':
        assert n == VANILLA_PARAMS  # nanoGPT's shakespeare_char model, 10.745M with learned positions
    assert abs(n - VANILLA_PARAMS) / VANILLA_PARAMS < 0.03, f"{model_type}: {n:,} params"


@pytest.mark.parametrize('model_type,more', [('delta', 34.1), ('delta_product', 133.2)])
def test_a_missed_match_is_an_error_naming_widths_that_fit(model_type, more):
    """At n_embd=96 the mixers' default widths outweigh vanilla's attention + MLP: d_ff clamps at 8 and the
    model had +34% / +133% of vanilla's parameters without a word. Now it is an error naming widths that
    would match; each of them does (within 3%), and an explicit d_ff builds the unmatched model."""
    import re
    with pytest.raises(ValueError, match=rf"parameter matching failed for {model_type}.*\+{more}% of vanilla's") as e:
        model_lib.build_model(model_type, n_embd=96)
    msg = str(e.value)
    fits = re.findall(r'(n_head|head_dim)=(\d+) or less', msg) + re.findall(r'(n_embd)=(\d+) or more', msg)
    assert {k for k, _ in fits} == {'n_head', 'head_dim', 'n_embd'}, msg
    for k, v in fits:
        kw = {'n_embd': 96, k: int(v)}
        n = model_lib.build_model(model_type, **kw).get_num_params(non_embedding=False)
        target = model_lib.build_model('vanilla', n_embd=kw['n_embd'], n_head=1).get_num_params(non_embedding=False)
        assert abs(n - target) / target <= model_lib.MATCH_TOLERANCE, (kw, n, target)
    assert model_lib.build_model(model_type, n_embd=96, d_ff=8).config.d_ff == 8  # matching off: no error


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_batch_rows_are_independent(model_type):
    m = tiny(model_type)
    T = m.config.block_size
    idx = torch.randint(0, 65, (3, T))
    logits, _ = m(idx)
    idx2 = idx.clone()
    idx2[1] = torch.randint(0, 65, (T,))  # change row 1 only
    logits2, _ = m(idx2)
    torch.testing.assert_close(logits2[0], logits[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(logits2[2], logits[2], rtol=0, atol=1e-10)
    assert not torch.allclose(logits2[1], logits[1])


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_future_tokens_dont_change_past_logits(model_type):
    m = tiny(model_type)
    T = m.config.block_size
    idx = torch.randint(0, 65, (2, T))
    logits, _ = m(idx)
    for t in (0, T // 2 - 1, T - 2):
        idx2 = idx.clone()
        idx2[:, t + 1:] = torch.randint(0, 65, (2, T - t - 1))
        logits2, _ = m(idx2)
        torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_prefill_then_steps_equals_full_forward(model_type):
    m = tiny(model_type)
    T = m.config.block_size
    idx = torch.randint(0, 65, (2, T))
    full, _ = m(idx)
    for split in (1, 17, T - 1):
        state = m.init_state(2, T)
        parts = [m(idx[:, :split], state=state)[0]]
        for t in range(split, T):
            parts.append(m(idx[:, t:t + 1], state=state)[0])
        assert state.pos == T
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('model_type', MODEL_TYPES)
@pytest.mark.parametrize('where', ['one', 'near_block', 'beyond_block'])
def test_cached_generate_equals_uncached(model_type, where):
    m = tiny(model_type)
    bs = m.config.block_size
    plen = {'one': 1, 'near_block': bs - 3, 'beyond_block': bs + 9}[where]
    torch.manual_seed(1)
    prompt = torch.randint(0, 65, (2, plen))
    a = m.generate(prompt, 12, temperature=0, use_cache=True)
    b = m.generate(prompt, 12, temperature=0, use_cache=False)
    assert a.shape == (2, plen + 12)
    assert torch.equal(a, b)


def test_vanilla_cache_is_a_real_cache():
    """The cache must be used: a decode step reads keys from it, so corrupting it changes the output."""
    m = tiny('vanilla')
    idx = torch.randint(0, 65, (1, 20))
    state = m.init_state(1, 32)
    m(idx, state=state)
    ok, _ = m(idx[:, -1:], state=state)
    state.pos -= 1
    for layer in state.layers:
        layer['k'][:, :, :5] += 1.0
    bad, _ = m(idx[:, -1:], state=state)
    assert not torch.allclose(ok, bad)


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_decode_state_bytes(model_type):
    m = tiny(model_type)
    b1, b2 = m.decode_state_bytes(1, 1024), m.decode_state_bytes(1, 4096)
    assert b1 > 0
    if model_type in ('delta', 'delta_product'):
        assert b1 == b2  # a fixed-size recurrent state
    else:
        assert b2 > b1  # a cache that grows with the context
    if model_type == 'vanilla':  # K and V, every layer, bf16
        c = m.config
        assert b1 == 2 * c.n_layer * c.n_embd * 1024 * 2


def test_unknown_model_type_names_choices():
    with pytest.raises(ValueError, match='valid choices: vanilla, delta, delta_product, nsa'):
        model_lib.get_model_module('mamba')


def test_unknown_config_key_names_valid_keys():
    with pytest.raises(ValueError, match='valid keys'):
        model_lib.build_model('vanilla', n_layers=3)


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_backward_through_a_stateful_continuation(model_type):
    """Training on a prefix held in a decode state (e.g. truncated BPTT) must not trip autograd on the
    in-place state updates."""
    m = tiny(model_type).train()
    idx = torch.randint(0, 65, (2, 20))
    state = m.init_state(2, 20)
    a, _ = m(idx[:, :10], state=state)
    b, _ = m(idx[:, 10:], state=state)
    (a.sum() + b.sum()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_generate_rejects_bad_arguments():
    m = tiny('vanilla')
    with pytest.raises(ValueError, match='prompt tokens'):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='temperature'):
        m.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=-1)
    with pytest.raises(ValueError, match='top_k'):
        m.generate(torch.zeros(1, 1, dtype=torch.long), 3, top_k=0)


# ----------------------------------------------------------------------------- sampling


def lively(m):
    """Weights of unit gain (std 1/sqrt(fan_in)), so that a random model's greedy continuation is not one
    token repeated (GPT-2's 0.02 init makes the logits nearly flat)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return m


def previous_greedy_generate(m, prompt, n):
    """generate(temperature=0) as it was before the draw moved onto the device: the cache, the window
    slide, eager argmax and a torch.cat per token (the reference the new path must equal token for token)."""
    ctx = m.max_context
    crop = (lambda s: s) if ctx is None else (lambda s: s[:, -ctx:])
    total = prompt.size(1) + n
    state = m.init_state(prompt.size(0), total if ctx is None else min(total, ctx))
    logits, _ = m(crop(prompt), state=state, last_only=True)
    idx = prompt
    for i in range(n):
        nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, nxt), dim=1)
        if i == n - 1:
            break
        if ctx is not None and state.pos >= ctx:
            state.reset()
            logits, _ = m(crop(idx), state=state, last_only=True)
        else:
            logits, _ = m(nxt, state=state, last_only=True)
    return idx


# a one-token prompt for every model; for vanilla also 70 > block_size 64 (its window slides at every token)
@pytest.mark.parametrize('model_type,plen', [(mt, 1) for mt in MODEL_TYPES] + [('vanilla', 70)])
def test_greedy_generation_equals_the_previous_path(model_type, plen):
    """Greedy decoding through the sampler (the preallocated buffer, the device-side column, argmax in
    sample_logits) gives the tokens the previous loop gave, for temperature 0 and for top_k=1."""
    m = lively(tiny(model_type))
    torch.manual_seed(1)
    prompt = torch.randint(0, 65, (2, plen))
    want = previous_greedy_generate(m, prompt, 20)
    assert torch.equal(m.generate(prompt, 20, temperature=0), want)
    assert torch.equal(m.generate(prompt, 20, temperature=0.7, top_k=1), want)
    assert len(set(want[:, plen:].flatten().tolist())) > 2  # not a degenerate constant continuation


def chi2_sf_even_dof(x, dof):
    """P(chi^2_dof > x) for an even dof, in closed form: exp(-x/2) sum_{i < dof/2} (x/2)^i / i!."""
    assert dof % 2 == 0
    return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(dof // 2))


# a fixed small vocabulary: the kept top-5 are tokens 7, 0, 1, 2, 3
DIST_LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, -2.0, 0.2]
DIST_T, DIST_K, DIST_N = 0.8, 5, 40_000


def check_top_k_distribution(draw, device):
    """Draw DIST_N tokens with draw(logits (N, 1, V), temperature tensor, top_k) and test them against the
    renormalised softmax(logits / T) over the top 5: a chi-square test over the 5 kept tokens (dof 4), passed
    at p > 1e-3; no other token may appear. The same counts tested against the untempered softmax (T = 1) must
    fail it: N is large enough for the test to see a wrong temperature."""
    logits = torch.tensor(DIST_LOGITS)
    kept = torch.topk(logits, DIST_K).indices.sort().values
    assert kept.tolist() == [0, 1, 2, 3, 7]
    torch.manual_seed(1234)
    x = logits.to(device).expand(DIST_N, 1, -1).contiguous()
    tokens = draw(x, torch.tensor(DIST_T, device=device), DIST_K).flatten().cpu()
    assert tokens.shape == (DIST_N,)
    counts = torch.bincount(tokens, minlength=len(DIST_LOGITS)).double()
    assert counts[[i for i in range(len(DIST_LOGITS)) if i not in kept]].sum() == 0, counts
    pvals = []
    for T in (DIST_T, 1.0):
        p = torch.softmax(logits[kept].double() / T, dim=0)
        expected = DIST_N * p
        stat = ((counts[kept] - expected) ** 2 / expected).sum().item()
        pvals.append(chi2_sf_even_dof(stat, DIST_K - 1))
    assert pvals[0] > 1e-3, f"chi-square p = {pvals[0]:.2e} against the renormalised top-k softmax ({counts})"
    assert pvals[1] < 1e-3, f"the test can't tell T = {DIST_T} from T = 1 (p = {pvals[1]:.2e})"


def test_top_k_sampling_distribution():
    """sample_logits (the sampler every step runs, eager here) draws from the renormalised top-k softmax."""
    check_top_k_distribution(model_lib.sample_logits, 'cpu')


@pytest.mark.skipif(not shutil.which(os.environ.get('CXX', 'g++')), reason="inductor's CPU backend needs a C++ compiler")
@torch.no_grad()
def test_compiled_sampler_draws_what_the_eager_sampler_draws():
    """compiled_sampler() (inductor, here on the CPU) takes the eager sampler's numbers from the same RNG state
    and leaves the generator where the eager one does: what lets the CUDA tests compare compiled and eager
    generations token for token. Without fallback_random inductor draws from a generator of its own, and
    without an explicit rate in exponential_ its Gumbel-max pass fails the compilation: both failed here."""
    x = torch.randn(256, 1, 65, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor(0.8)
    torch._dynamo.reset()
    for top_k in (20, None):
        out = []
        for fn in (model_lib.sample_logits, model_lib.compiled_sampler()):
            torch.manual_seed(5)
            out.append((fn(x, temperature, top_k), torch.rand(3)))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]), top_k
    assert torch.equal(model_lib.compiled_sampler()(x, None, None), x[:, -1].argmax(-1, keepdim=True))
    torch._dynamo.reset()


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_seeded_sampling_is_reproducible(model_type):
    """The same seed gives the same tokens, another seed other tokens; and cached decoding draws what
    uncached decoding draws (the same logits, in float64, and the same RNG stream: one draw per token)."""
    m = lively(tiny(model_type))
    prompt = torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(3))
    runs = {}
    for seed, cache in ((5, True), (5, True), (6, True), (5, False)):
        torch.manual_seed(seed)
        runs.setdefault((seed, cache), []).append(m.generate(prompt, 16, temperature=0.9, top_k=20, use_cache=cache))
    a, b = runs[(5, True)]
    assert torch.equal(a, b)
    assert not torch.equal(a, runs[(6, True)][0])
    assert torch.equal(a, runs[(5, False)][0])
    assert len(set(a[:, 9:].flatten().tolist())) > 5  # a real sample, not a greedy-like constant


def test_generate_stats_and_the_compile_decision():
    """generate(stats=...) says how it ran; compile='auto' compiles only when the steps pay for it."""
    m = tiny('vanilla')
    st = {}
    y = m.generate(torch.zeros(1, 3, dtype=torch.long), 6, temperature=0.8, top_k=10, stats=st)
    assert y.shape == (1, 9)
    assert st['mode'] == 'eager' and st['why'].startswith('no CUDA') and st['decode_steps'] == 5
    assert st['prefill_s'] > 0 and st['decode_s'] > 0 and st['ms_per_token'] == pytest.approx(1e3 * st['decode_s'] / 5)
    pays, why = model_lib.compile_pays('delta', 10_000)
    assert not pays and '10,000 steps < ' in why
    n = math.ceil(model_lib.COMPILE_COST_S['nsa'] * 1e3 / model_lib.COMPILE_SAVES_MS['nsa'])
    assert model_lib.compile_pays('nsa', n)[0] and not model_lib.compile_pays('nsa', n - 1)[0]
    assert not model_lib.compile_pays('new_mechanism', n)[0]  # unmeasured: the least favourable figures
    with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 2, compile='yes')
    with pytest.raises(RuntimeError, match='token buffer is full'):
        sampler = model_lib.TokenSampler(torch.zeros(1, 2, dtype=torch.long), 2)
        sampler(torch.zeros(1, 1, 65))


def test_compile_decision_figures_are_the_committed_measurements():
    """compile_pays's cost and saving are results/full/latency.csv's (H200): the cost is compiled_build_s at
    each model's first context (the cold compilation), the saving graph minus compiled generate() at 1024."""
    import csv
    rows = list(csv.DictReader(open(os.path.join(ROOT, 'results', 'full', 'latency.csv'))))
    for mt in ('vanilla', 'delta', 'delta_product', 'nsa'):
        mine = [r for r in rows if r['model'] == mt]
        assert float(mine[0]['compiled_build_s']) == pytest.approx(model_lib.COMPILE_COST_S[mt], rel=1e-5)
        at = next(r for r in mine if r['context'] == '1024')
        saved = float(at['generate_graph_ms_per_token']) - float(at['generate_compiled_ms_per_token'])
        assert saved == pytest.approx(model_lib.COMPILE_SAVES_MS[mt], rel=1e-5)


# ----------------------------------------------------------------------------- static (CUDA-graph) decoding

STATIC = [mt for mt in MODEL_TYPES if model_lib.build_model(mt, **model_lib.get_model_module(mt).TINY).static_decode]


def test_which_models_decode_statically():
    assert STATIC == ['vanilla', 'delta', 'delta_product', 'nsa']


@pytest.mark.parametrize('model_type', STATIC)
def test_static_step_equals_the_dynamic_step(model_type):
    """The one-token step with a tensor position (full-cache masked attention, index_copy_ writes: what a
    CUDA graph captures) computes what the ordinary cached step computes, and leaves the same state.
    The steps run to the end of the context: NSA's (blocks of 16, 4 selected) complete several blocks
    on the way, so its compressed-key writes and a real top-k choice among up to 8 blocks are covered."""
    m = tiny(model_type)
    prompt = torch.randint(0, 65, (2, 9))
    cap = m.config.block_size
    a, b = m.init_state(2, cap), m.init_state(2, cap)
    m(prompt, state=a)
    m(prompt, state=b)
    tok = torch.randint(0, 65, (2, 1))
    for _ in range(cap - 9):
        la, _ = m(tok, state=a, last_only=True)
        lb, _ = m(tok, state=b, last_only=True, static_pos=torch.tensor(b.pos))
        torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-10)
        tok = la[:, -1].argmax(-1, keepdim=True)
    assert a.pos == b.pos == cap
    for sa, sb in zip(a.layers, b.layers):
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('model_type', STATIC)
def test_static_step_stays_on_the_device(model_type, monkeypatch):
    """What a CUDA graph can't capture, checked without a GPU by recording every op the static step
    dispatches, once on CPU and once on the meta device. Flagged: a tensor made from host data
    (lift_fresh: x[:, [-1]] once broke every capture on the H200; only the CPU run shows it), an op
    touching a tensor on another device (a host tensor copied in, torch.arange(n).to(dev): only the
    meta run shows it), and host syncs or data-dependent shapes
    (_local_scalar_dense: .item(), int(t); nonzero: boolean indexing)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Ops(TorchDispatchMode):
        def __init__(self, home):
            super().__init__()
            self.home, self.seen, self.bad = home, 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            devs = {t.device.type for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)}
            if devs - {self.home} or any(k in str(func) for k in ('lift_fresh', '_local_scalar_dense', 'nonzero')):
                self.bad.append(f"{func} on {sorted(devs)}")
            return func(*args, **(kwargs or {}))

    real_autocast = torch.autocast  # the mixers switch autocast off by device type; meta has none
    monkeypatch.setattr(torch, 'autocast', lambda device_type, *a, **k: real_autocast(
        'cpu' if device_type == 'meta' else device_type, *a, **k))
    for dev in ('cpu', 'meta'):
        for sampling in (None, (0.8, 5), (0, None)):  # the step alone; with a top-k draw; with a greedy one
            m = tiny(model_type).to(dev).eval()
            st = m.init_state(2, m.config.block_size)
            m(torch.zeros(2, 5, dtype=torch.long, device=dev), state=st)  # prefill
            tok, pos = torch.zeros(2, 1, dtype=torch.long, device=dev), torch.tensor(st.pos, device=dev)
            sampler = model_lib.TokenSampler(torch.zeros(2, 12, dtype=torch.long, device=dev), 6, *sampling,
                                             vocab_size=65) if sampling else None
            with torch.no_grad(), Ops(dev) as ops:
                logits, _ = m(tok, state=st, last_only=True, static_pos=pos)
                if sampler is not None:  # what GraphedDecodeStep captures after the step
                    sampler.draw(logits)
                    pos.add_(1)
            assert not ops.bad, f"the static step would not capture ({dev} run, sampling {sampling}): " \
                                f"{sorted(set(ops.bad))}"
            assert ops.seen > 20  # the recorder saw the step
            if sampler is not None and dev == 'cpu':  # and the draw was made and written where it belongs
                assert sampler.col.item() == 7 and torch.equal(sampler.seq[:, 6:7], sampler.tok)
                assert 0 <= sampler.tok.min() and sampler.tok.max() < 65


@pytest.mark.parametrize('model_type', STATIC)
@torch.no_grad()  # as decoding runs (a state written with grad on would start requiring grad: a guard)
def test_static_step_compiles_to_one_graph_and_no_recompiles(model_type):
    """What generate(compile=True) relies on, checked on CPU with a counting backend in place of inductor
    and compiled as compiled_static_step() is (GPT.static_step, fullgraph): dynamo traces the static step
    whole (no graph break), its output equals the uncompiled step's, later positions reuse the
    compilation, and a new state capacity (a KV cache sized to another sequence) compiles once more,
    dynamically, so a third capacity compiles nothing."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    m = tiny(model_type)
    step = functools.partial(torch.compile(model_lib.GPT.static_step, backend=counting_backend, fullgraph=True), m)
    per_cap = []
    for cap in (20, 24, 28):
        a, b = m.init_state(2, cap), m.init_state(2, cap)
        prompt = torch.randint(0, 65, (2, 9))
        m(prompt, state=a)
        m(prompt, state=b)
        tok = prompt[:, -1:].clone()  # contiguous, like the tokens that follow (strides are guarded too)
        for _ in range(4):
            want = m.static_step(tok, a.layers, torch.tensor(a.pos))
            got = step(tok, b.layers, torch.tensor(b.pos))
            a.pos += 1
            b.pos += 1
            torch.testing.assert_close(got, want)
            tok = want[:, -1].argmax(-1, keepdim=True)
        per_cap.append(len(graphs))
    recurrent = model_type in ('delta', 'delta_product')  # fixed-size state: the capacity changes no shape
    assert per_cap == ([1, 1, 1] if recurrent else [1, 2, 2]), per_cap
    assert model_lib.compiled_static_step() is model_lib.compiled_static_step()  # one for every model
    torch._dynamo.reset()


@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_precast_weights_give_the_same_step_with_fewer_casts(model_type):
    """GraphedDecodeStep casts the Linear weights once and swaps the copies in (model.weights_swapped),
    so that a replay doesn't cast them again. Checked on CPU under bf16 autocast: the step's logits and
    state are bit-for-bit those of the plain autocast step, no weight matrix is cast any more (the 2-D
    casts: activations here are 3-D), the real parameters are back afterwards, and a compiled step fed a
    second set of copies compiles nothing more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCasts.n += func is torch.ops.aten._to_copy.default and args[0].dim() == 2
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = tiny(model_type).float()  # autocast leaves fp64 alone
    params = dict(m.named_parameters())
    prompt = torch.randint(0, 65, (2, 9))
    amp = lambda: torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False)
    out, casts = [], []
    for swap in (False, True):
        st = m.init_state(2, 16)
        with torch.no_grad(), amp():
            m(prompt, state=st)
            w = model_lib.cast_linear_weights(m, torch.bfloat16) if swap else {}
            CountCasts.n = 0
            with model_lib.weights_swapped(m, w), CountCasts():
                logits = m.static_step(prompt[:, -1:], st.layers, torch.tensor(st.pos))
        out.append((logits, [t.clone() for layer in st.layers for t in layer.values()]))
        casts.append(CountCasts.n)
    assert casts[0] > 0 and casts[1] == 0, casts
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    assert all(p is params[n] for n, p in m.named_parameters())  # restored, the very Parameter objects
    assert m.lm_head.weight is m.transformer.wte.weight           # still tied
    with pytest.raises(KeyError):                                  # restored after an error in the block too
        with model_lib.weights_swapped(m, model_lib.cast_linear_weights(m, torch.bfloat16)):
            raise KeyError('inside')
    assert all(p is params[n] for n, p in m.named_parameters())
    # autocast leaves fp64 alone, so an fp64 model gets no copies (bf16 ones would break its matmuls)
    assert model_lib.cast_linear_weights(tiny(model_type), torch.bfloat16) == {}

    graphs = []
    torch._dynamo.reset()
    step = torch.compile(model_lib.GPT.static_step, backend=lambda gm, ex: graphs.append(gm) or gm.forward,
                         fullgraph=True)
    st = m.init_state(2, 16)
    with torch.no_grad(), amp():
        m(prompt, state=st)
        for _ in range(2):  # a fresh set of copies, as each new GraphedDecodeStep makes
            w = model_lib.cast_linear_weights(m, torch.bfloat16)
            with model_lib.weights_swapped(m, w):
                step(m, prompt[:, -1:], st.layers, torch.tensor(st.pos))
    assert len(graphs) == 1, len(graphs)
    torch._dynamo.reset()


def test_static_decoding_is_refused_where_it_cant_work(monkeypatch):
    import model_nsa
    monkeypatch.setattr(model_nsa.NSAMixer, 'static_decode', False)  # stands for a mixer without a static step
    nsa = tiny('nsa')
    st = nsa.init_state(1, 32)
    nsa(torch.zeros(1, 4, dtype=torch.long), state=st)
    with pytest.raises(ValueError, match='static decoding'):
        nsa(torch.zeros(1, 1, dtype=torch.long), state=st, static_pos=torch.tensor(st.pos))
    with pytest.raises(ValueError, match="can't decode with static shapes"):
        model_lib.GraphedDecodeStep(nsa, st)
    van = tiny('vanilla')
    with pytest.raises(ValueError, match='need a model on a CUDA device'):
        model_lib.GraphedDecodeStep(van, van.init_state(1, 8))
    with pytest.raises(ValueError, match='cuda_graph=True needs a model on a CUDA device'):
        van.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        van.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0, cuda_graph='yes')
    with pytest.raises(ValueError, match="compile=True compiles the CUDA-graph decoding step"):
        van.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0, compile=True)


class EmulatedGraphStep(model_lib.GraphedDecodeStep):
    """GraphedDecodeStep on the CPU with the CUDA graph emulated: the capture runs the step once more (a real
    one runs nothing: the constructor's undo and state copy cover both) and a replay runs it again into the
    captured output. What it checks is the class's own bookkeeping around the graph."""
    device_type = 'cpu'

    class Replayer:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    @staticmethod
    def capture(fn, warmup, after_warmup=None):
        rng = torch.get_rng_state()  # as capture_cuda_graph restores the CUDA generator's
        for _ in range(warmup):
            fn()
            after_warmup()
        out = fn()
        torch.set_rng_state(rng)
        return EmulatedGraphStep.Replayer(fn, out), out


@pytest.mark.parametrize('model_type', STATIC)
def test_graphed_sampling_bookkeeping_on_cpu(model_type):
    """A sampled GraphedDecodeStep (the replays draw into the sampler, advance its column and the device-side
    position themselves), graph emulated on the CPU: the tokens of eager generate() from the same seed, also
    with an eager step run between two replays (the position is then filled again), and the warm-up steps
    leave no trace (state, sampler, RNG)."""
    m = lively(tiny(model_type))
    prompt = torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(4))
    n = 14
    torch.manual_seed(11)
    want = m.generate(prompt, n, temperature=0.9, top_k=20)
    torch.manual_seed(11)
    seq = torch.zeros(2, 9 + n, dtype=torch.long)
    seq[:, :9] = prompt
    sampler = model_lib.TokenSampler(seq, 9, 0.9, 20, vocab_size=65)
    state = m.init_state(2, 9 + n)
    with torch.no_grad():
        sampler(m(prompt, state=state, last_only=True)[0])
        step = EmulatedGraphStep(m, state, sampler=sampler)
        assert (state.pos, sampler.n, sampler.col.item()) == (9, 10, 10)
        for i in range(1, n):
            if i == 6:  # an eager step in between: the replays after it must read the new position
                sampler(m(sampler.tok, state=state, last_only=True)[0])
            else:
                step()
            assert state.pos == 9 + i and sampler.n == sampler.col.item() == 10 + i
            assert step.pos_t.item() == state.pos or i == 6
    assert torch.equal(seq, want)


def _cuda_generation_case(model_type):
    """(model, prompt, n) of the CUDA generation tests: the tiny fp32 model at unit-scale weights (sharp
    logits, so near-ties don't flip), a batch of two 40-token prompts, and block_size new tokens: long enough
    to slide vanilla's window."""
    mod = model_lib.get_model_module(model_type)
    torch.manual_seed(0)
    m = model_lib.build_model(model_type, **mod.TINY).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return m, torch.randint(0, 65, (2, 40), device='cuda'), m.config.block_size


@pytest.mark.cuda
@pytest.mark.parametrize('compile', [False, True])
@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_cuda_graph_generation_equals_eager_generation(model_type, compile):
    """generate() on CUDA replays its steps from a CUDA graph where it can: the same greedy tokens as eager
    steps (fp32 model, so near-ties don't flip), through a window re-prefill for learned positions."""
    m, prompt, n = _cuda_generation_case(model_type)
    want = m.generate(prompt, n, temperature=0, cuda_graph=False)
    # graphed where static_decode, and required there: 'auto' would fall back to eager steps and pass anyway
    got = m.generate(prompt, n, temperature=0, cuda_graph=True if m.static_decode else 'auto', compile=compile)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize('compile', [False, True])
@pytest.mark.parametrize('model_type', MODEL_TYPES)
def test_cuda_graph_sampling_equals_eager_sampling(model_type, compile):
    """Top-k sampling drawn inside the CUDA graph (and inside the compiled one) gives the tokens eager steps
    give from the same seed: the same sampler on the same RNG stream (a replay advances the default
    generator's Philox offset as an eager draw does; inductor calls ATen's exponential_). The model and shapes
    of the greedy test above (fp32; the window of vanilla slides), so the compiled step is reused."""
    m, prompt, n = _cuda_generation_case(model_type)
    kw = dict(temperature=0.8, top_k=20)
    torch.manual_seed(7)
    want = m.generate(prompt, n, cuda_graph=False, **kw)
    torch.manual_seed(7)
    st = {}
    got = m.generate(prompt, n, cuda_graph=True, compile=compile, stats=st, **kw)
    assert st['mode'] == ('compiled graph' if compile else 'graph'), st
    assert torch.equal(got, want)
    torch.manual_seed(8)
    assert not torch.equal(m.generate(prompt, n, cuda_graph=True, compile=compile, **kw), want)
    assert len(set(want[:, 40:].flatten().tolist())) > 5


@pytest.mark.cuda
def test_top_k_sampling_distribution_cuda():
    """The distribution test on the GPU, for each way the draw runs there: eager, compiled
    (compiled_sampler), and replayed from a CUDA graph, whose replays must each draw new noise."""
    check_top_k_distribution(model_lib.sample_logits, 'cuda')
    check_top_k_distribution(model_lib.compiled_sampler(), 'cuda')

    def graphed(x, temperature, top_k, rows=4000):
        xs = x[:rows].clone()
        graph, out = model_lib.capture_cuda_graph(lambda: model_lib.sample_logits(xs, temperature, top_k), warmup=1)
        draws = []
        for _ in range(x.size(0) // rows):
            graph.replay()
            draws.append(out.clone())
        assert not torch.equal(draws[0], draws[1])  # the offset advanced between replays
        return torch.cat(draws)
    check_top_k_distribution(graphed, 'cuda')


@pytest.mark.cuda
def test_dynamic_compiled_sampled_steps_match_eager_steps():
    """What bench.py decode_throughput runs: GraphedDecodeStep(compile=True, dynamic=True, restore=False)
    with a greedy sampler, at several batch sizes and capacities from one compilation (the batch dimension
    and the KV capacity marked dynamic): its tokens equal eager steps' at each shape (fp32, so near-ties
    don't flip; restore=False leaves the warm-up steps' writes in the cache, at the slot the first real
    step writes again)."""
    torch.manual_seed(0)
    m = model_lib.build_model('vanilla', **{**model_lib.TINY, 'block_size': 128}).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    for B, cap in ((2, 48), (3, 48), (5, 96)):
        prompt = torch.randint(0, 65, (B, 8), device='cuda')
        with torch.no_grad():
            want = m.generate(prompt, 12, temperature=0, cuda_graph=False)
            state = m.init_state(B, cap)
            m(prompt, state=state)
            sampler = model_lib.TokenSampler(torch.zeros(B, 12, dtype=torch.long, device='cuda'), 0, 0)
            sampler.tok.copy_(want[:, 8:9])
            sampler.seq[:, 0] = want[:, 8]
            sampler.reset(1)
            step = model_lib.GraphedDecodeStep(m, state, compile=True, sampler=sampler, restore=False, dynamic=True)
            for _ in range(11):
                step()
        assert torch.equal(sampler.seq, want[:, 8:]), (B, cap)


@pytest.mark.cuda
@pytest.mark.parametrize('compile', [False, True])
@pytest.mark.parametrize('model_type', STATIC)
def test_cuda_graph_step_built_under_autocast_outlives_the_context(model_type, compile):
    """A graphed step captured under bf16 autocast, replayed after that context has closed (as bench's
    latency timing does): its logits equal eager steps run under autocast (the graph must make its own
    bf16 weight copies, not record ones from autocast's cache, which is freed when the context exits)."""
    mod = model_lib.get_model_module(model_type)
    torch.manual_seed(0)
    m = model_lib.build_model(model_type, **mod.TINY).cuda().eval()
    prompt = torch.randint(0, 65, (1, 8), device='cuda')
    ac = lambda: torch.autocast('cuda', dtype=torch.bfloat16)  # noqa: E731
    a, b = m.init_state(1, 32, dtype=torch.bfloat16), m.init_state(1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        with ac():
            m(prompt, state=a)
            m(prompt, state=b)
            step = model_lib.GraphedDecodeStep(m, b, compile=compile)
        torch.cuda.empty_cache()
        junk = torch.randn(1 << 20, device='cuda')  # takes any freed blocks the graph might still point to
        tok = prompt[:, -1:]
        for _ in range(5):
            with ac():
                want = m(tok, state=a, last_only=True)[0]
                got = step(tok)
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            tok = want[:, -1].argmax(-1, keepdim=True)
        del junk
