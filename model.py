"""
The one GPT skeleton, and the vanilla (causal softmax attention) token mixer.

Every model in this repository is this GPT: token embedding (+ optional learned positions),
N x Block(norm -> mixer -> residual, norm -> MLP -> residual), a final norm and an LM head
tied to the token embedding. The four model files differ only in the *token mixer*:

    model.py                 CausalSelfAttention   (softmax attention, static KV cache)
    model_delta.py           DeltaNetMixer         (delta rule, fixed-size recurrent state)
    model_delta_product.py   GatedDeltaProductMixer (n_h Householder steps per token + forget gate)
    model_nsa.py             NSAMixer              (compressed + selected + sliding-window attention)

A mixer module implements this interface (see CausalSelfAttention for the reference one):

    __init__(config, layer_idx)
    forward(x, state=None, pos=0) -> y
        x, y: (B, T, C). With state=None: causal over the T positions (training, no cache).
        With a state: x continues a sequence whose first `pos` tokens the state has already
        absorbed; the mixer reads and updates the state in place (prefill when T > 1,
        one decoding step when T == 1).
    init_state(batch_size, max_len, device, dtype) -> dict[str, Tensor]
        Preallocated decoding state for sequences of up to max_len tokens. Static shapes,
        so decode steps can be captured by torch.compile / CUDA graphs.
    flops_per_token(T) -> int
        Forward FLOPs per token that the parameters don't account for (e.g. QK^T and AV),
        at context length T; feeds estimate_mfu and the FLOPs axis of the bake-off.
    post_init()  (optional)
        Mixer-specific initialisation, run after the generic one (gates, decay rates...).
    static_decode (class attribute, default False)
        True if a one-token step (T == 1) also accepts `pos` as a 0-d long tensor and then runs with
        shapes and indices that depend on no Python value, so the step can be captured in a CUDA graph
        (GraphedDecodeStep). Recurrent mixers ignore pos and are static as they are.

Its output projection is named `c_proj` so it gets GPT-2's scaled residual init.
Parameters flagged `p._no_weight_decay = True` are excluded from weight decay.
"""

import functools
import importlib
import inspect
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

# model_type -> module that exposes GPTConfig and GPT for it. Imported lazily, so the CPU
# path never imports fla / triton.
MODEL_TYPES = {
    'vanilla': 'model',
    'delta': 'model_delta',
    'delta_product': 'model_delta_product',
    'nsa': 'model_nsa',
}


def get_model_module(model_type):
    """The module (GPTConfig, GPT) for a model_type, with a clear error for unknown ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; valid choices: {', '.join(MODEL_TYPES)}")
    return importlib.import_module(MODEL_TYPES[model_type])


def build_model(model_type, **kwargs):
    """GPT for `model_type`, built from GPTConfig(**kwargs); unknown keys raise and name the valid ones."""
    mod = get_model_module(model_type)
    valid = {f.name for f in fields(mod.GPTConfig)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for model_type {model_type!r}; "
                         f"valid keys: {', '.join(sorted(valid))}")
    return mod.GPT(mod.GPTConfig(**{**kwargs, 'model_type': model_type}))


# Backends of the mixers that have GPU kernels: 'auto' = fla's kernels on CUDA tensors, the PyTorch
# reference elsewhere; 'fla' = the kernels or an error; 'torch' = the reference everywhere.
BACKENDS = ('auto', 'fla', 'torch')


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_fla(backend, x):
    """Whether a mixer with this backend runs fla's kernels on x; 'fla' on a non-CUDA tensor is an error."""
    if backend == 'fla' and x.device.type != 'cuda':
        raise RuntimeError(f"backend='fla' needs CUDA tensors (fla's Triton kernels), got {x.device.type}; "
                           f"use backend='torch' or 'auto' there")
    return backend == 'fla' or (backend == 'auto' and x.device.type == 'cuda')


def rel_rms(a, b):
    """Relative RMS error ||a - b|| / ||b||, in fp64: how kernels are compared with the references."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state_nbytes(state):
    """Bytes held by a decoding state (a DecodeState, a dict of tensors, or a list of them)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, DecodeState):
        return state_nbytes(state.layers)
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def count_params(config, gpt_cls):
    """Total trainable parameters of gpt_cls(config), built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        return gpt_cls(config).get_num_params(non_embedding=False)


# parameter matching (d_ff=-1) must bring a model within this fraction of vanilla's total parameters
MATCH_TOLERANCE = 0.03


def match_d_ff(config, gpt_cls, multiple=8):
    """(d_ff, total params, vanilla's total params): the MLP width (a multiple of `multiple`, at least
    `multiple`) that brings this model's *total* trainable parameters (embeddings included, tied head
    counted once) closest to the vanilla GPT with the same n_layer, n_embd, vocab_size, block_size and
    bias. The mixer keeps the widths its config gives it; only the MLP absorbs the difference, since
    params are linear in d_ff (so the total needs no second build)."""
    target = count_params(GPTConfig(n_layer=config.n_layer, n_embd=config.n_embd, vocab_size=config.vocab_size,
                                    block_size=config.block_size, bias=config.bias, n_head=1), GPT)
    base_ff = 4 * config.n_embd
    here = count_params(replace(config, d_ff=base_ff), gpt_cls)
    per_unit = config.n_layer * (2 * config.n_embd + (1 if config.bias else 0))  # params per unit of d_ff
    d_ff = max(multiple, int(round((base_ff + (target - here) / per_unit) / multiple)) * multiple)
    return d_ff, here + (d_ff - base_ff) * per_unit, target


def _matches(config, gpt_cls, multiple, **change):
    """Whether config with `change` builds and matches vanilla within MATCH_TOLERANCE."""
    try:
        _, total, target = match_d_ff(replace(config, **change), gpt_cls, multiple)
    except ValueError:  # a width the mixer refuses (e.g. NSA's kernel rules)
        return False
    return abs(total - target) <= MATCH_TOLERANCE * target


def widths_that_match(config, gpt_cls, multiple=8):
    """Where a match misses (the mixer alone outweighs vanilla's attention + MLP, so d_ff is clamped at its
    minimum): the nearest widths that would match, one change at a time: the largest n_head, the largest
    head_dim (multiples of 8 and powers of two) and the smallest n_embd (multiples of 32) that do."""
    found = []
    for key in ('n_head', 'head_dim'):
        cur = getattr(config, key, None)
        if not isinstance(cur, int) or isinstance(cur, bool):
            continue
        cands = [v for v in range(cur - 1, 0, -1) if key == 'n_head' or v % 8 == 0 or v & (v - 1) == 0]
        v = next((v for v in cands if _matches(config, gpt_cls, multiple, **{key: v})), None)
        if v is not None:
            found.append(f"{key}={v} or less")
    e = next((e for e in range(32 * (config.n_embd // 32 + 1), 8 * config.n_embd + 1, 32)
              if _matches(config, gpt_cls, multiple, n_embd=e)), None)
    if e is not None:
        found.append(f"n_embd={e} or more")
    return found


def solve_d_ff(config, gpt_cls, multiple=8):
    """The parameter-matching solver (d_ff=-1): match_d_ff's width. A match that misses vanilla's total by
    more than MATCH_TOLERANCE is an error naming the widths that would fit; an explicit d_ff (0 = 4 * n_embd,
    or a width) turns matching off."""
    d_ff, total, target = match_d_ff(config, gpt_cls, multiple)
    if abs(total - target) > MATCH_TOLERANCE * target:
        fits = widths_that_match(config, gpt_cls, multiple)
        why = (f"d_ff at its minimum {d_ff}: the mixer's widths outweigh vanilla's attention and MLP"
               if d_ff == multiple else f"d_ff={d_ff}")
        raise ValueError(
            f"parameter matching failed for {config.model_type}: {total:,} parameters, "
            f"{100 * (total - target) / target:+.1f}% of vanilla's {target:,} at n_layer={config.n_layer}, n_embd="
            f"{config.n_embd} (tolerance {MATCH_TOLERANCE:.0%}), with {why}. Widths that would match: "
            f"{'; '.join(fits) if fits else 'none found by changing one of them'}; or give d_ff explicitly "
            f"(e.g. d_ff={d_ff}) to train it unmatched")
    return d_ff


class DecodeState:
    """Per-layer mixer states plus the number of tokens absorbed so far (`pos`)."""

    def __init__(self, layers, max_len):
        self.layers = layers      # list (one per layer) of dict[str, Tensor]
        self.max_len = max_len    # capacity in tokens (KV caches); recurrent states ignore it
        self.pos = 0

    def reset(self):
        """Forget everything: zero every buffer (recurrent states must restart from 0)."""
        for layer in self.layers:
            for t in layer.values():
                t.zero_()
        self.pos = 0

    def nbytes(self):
        return state_nbytes(self.layers)


def first_line(e, n=300):
    """The first line of an exception's message (which may be empty), at most n characters."""
    return (str(e).splitlines() or [''])[0][:n]


class CaptureError(RuntimeError):
    """A CUDA graph could not be captured (e.g. a kernel that synchronises with the host)."""


def capture_cuda_graph(fn, warmup, after_warmup=None):
    """Run fn() `warmup` times on a side stream (autotuning, compilation, lazy allocations), calling
    after_warmup() after each, then capture one call of fn in a CUDA graph on the current device.
    Returns (graph, what the captured call returned). The CUDA RNG state is restored afterwards, even on
    error: the warm-up calls' dropout or sampling draws must not shift the caller's stream (a resumed
    run continues it exactly). An error in a warm-up call propagates as it is; one in the capture raises
    CaptureError, with the current stream restored (a failed capture_end() can leave the capture's side
    stream current)."""
    cur = torch.cuda.current_stream()
    rng = torch.cuda.get_rng_state()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    try:
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
                    if after_warmup is not None:
                        after_warmup()
        finally:  # also after a failed warm-up: what the caller does next is ordered after the side stream
            cur.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        except Exception as e:
            torch.cuda.set_stream(cur)
            torch.cuda.synchronize()
            raise CaptureError(f"{type(e).__name__}: {first_line(e)}") from e
    finally:
        torch.cuda.set_rng_state(rng)
    return graph, out


_COMPILED_STEP = []  # [compiled_static_step()], made on first use


def compiled_static_step():
    """GPT.static_step under torch.compile, called as fn(model, idx, layer_states, pos). One for the whole
    process: dynamo keeps compilations per code object, whatever wrapper calls it, so a model of the same
    class and shapes reuses another's compilation. The KV capacity (a cache sized to the sequence) is the
    one shape that varies between generations: its second value compiles once more, with that dimension
    dynamic, and later values compile nothing. fullgraph: a graph break is an error, not a silently
    slower step."""
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(GPT.static_step, fullgraph=True))
    return _COMPILED_STEP[0]


_COMPILED_SAMPLER = []  # [compiled_sampler()], made on first use


def compiled_sampler():
    """sample_logits under torch.compile, one for the whole process (as compiled_static_step): what a compiled
    GraphedDecodeStep with a sampler runs after the compiled step, its few elementwise kernels fused.
    fallback_random: by default inductor replaces exponential_ with its own generator (seeded from the
    default one: valid noise, but not the numbers an eager draw takes); with it, the compiled sampler calls
    ATen's exponential_, so it draws what the eager sampler draws from the same RNG state (the same Philox
    stream and offsets), and a compiled generation can be checked token for token against an eager one."""
    if not _COMPILED_SAMPLER:
        _COMPILED_SAMPLER.append(torch.compile(sample_logits, fullgraph=True, options={'fallback_random': True}))
    return _COMPILED_SAMPLER[0]


def _recompile_limit(n):
    """Dynamo's per-code-object recompile limit raised to at least n while a step compiles: every model
    type and configuration in a process adds compilations of the one static_step, and at the default
    limit (8) a test session or a benchmark over many models would run out (fullgraph then raises)."""
    cfg = torch._dynamo.config
    key = 'recompile_limit' if hasattr(cfg, 'recompile_limit') else 'cache_size_limit'
    return cfg.patch(**{key: max(n, getattr(cfg, key))})


def cast_linear_weights(model, dtype):
    """{qualified name: a `dtype` copy} of every nn.Linear weight that autocast to `dtype` would cast on each
    call: the fp32 ones (and those of the other low-precision dtype); autocast leaves fp64 alone."""
    return {f"{n}.weight" if n else 'weight': m.weight.detach().to(dtype)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and m.weight.dtype != dtype}


@contextmanager
def weights_swapped(model, tensors):
    """The model's parameters named in `tensors` (qualified names) replaced by those tensors inside the
    block, restored after it. A tied parameter is replaced only under the name given (the LM head's
    weight, not the token embedding it shares)."""
    saved = []
    try:
        for name, t in tensors.items():
            mod_name, _, attr = name.rpartition('.')
            mod = model.get_submodule(mod_name)
            saved.append((mod, attr, mod._parameters[attr]))
            mod._parameters[attr] = t
        yield
    finally:
        for mod, attr, p in reversed(saved):
            mod._parameters[attr] = p


# ----------------------------------------------------------------------------- sampling on the device
def sampling_params(temperature, top_k, vocab_size):
    """(temperature, top_k) as sample_logits takes them: (None, None) for greedy decoding (temperature 0, or
    top_k 1: a single candidate), top_k None where it would keep every token (k >= vocab_size)."""
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0 (0 = greedy) and top_k >= 1 or None; got {temperature}, {top_k}")
    if temperature == 0 or top_k == 1:
        return None, None
    return float(temperature), (None if top_k is None or top_k >= vocab_size else int(top_k))


def sample_logits(logits, temperature=None, top_k=None):
    """The next tokens (B, 1) from logits (B, 1, V) (the last position's), drawn on the device without a host
    sync: what a CUDA graph captures after the decoding step (GraphedDecodeStep with a TokenSampler) and
    torch.compile fuses (compiled_sampler). temperature None: greedy, the argmax (the first of equal
    maxima, as before). Otherwise a draw from softmax(logits / temperature) over the top_k largest logits
    (ties with the k-th kept), renormalised, made as an exponential race:

        token = argmax_i p_i / E_i,   E_1..E_V ~ Exp(1) independent.

    Why it samples p exactly: E_i / p_i is exponential with rate p_i, and of independent exponentials with
    rates p_1..p_V the i-th is the smallest with probability
        P(E_i/p_i < E_j/p_j for all j != i) = int_0^inf p_i e^(-p_i t) prod_(j != i) e^(-p_j t) dt
                                            = p_i / sum_j p_j = p_i;
    the smallest E_i / p_i is the largest p_i / E_i. A masked token has p_i = 0, so p_i / E_i = 0 and it never
    beats the most likely token (p >= 1/V, and ATen's exponential_ returns neither 0 nor more than ~23 in
    fp32, so its score is positive). Unlike torch.multinomial there is no cumulative sum and no host round
    trip, and every call consumes the same amount of the RNG stream (one exponential per logit), which is
    what a CUDA graph replays.
    temperature: a float or a 0-d tensor on the logits' device (TokenSampler passes a tensor: a graph or a
    compiled step reads it from the device, so a new value neither recompiles nor recaptures)."""
    logits = logits[:, -1, :]                                   # (B, V)
    if temperature is None:
        return logits.argmax(dim=-1, keepdim=True)              # (B, 1)
    x = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]       # (B, 1): the k-th largest
        # masked_fill, not x[x < kth] = -inf: a boolean-mask assignment finds the indices first (a host sync)
        x = x.masked_fill(x < kth, float('-inf'))
    probs = F.softmax(x, dim=-1)                                # (B, V), renormalised over the kept tokens
    # E_i ~ Exp(1). The rate is passed: inductor's apply_gumbel_max_trick pass, which rewrites this argmax into
    # the equivalent Gumbel-max form, unpacks (tensor, rate) from the call and fails on exponential_()
    # (torch 2.13: "not enough values to unpack"), which failed the compilation
    race = torch.empty_like(probs).exponential_(1.0)
    return torch.argmax(probs / race, dim=-1, keepdim=True)    # (B, 1)


class TokenSampler:
    """Where the generated tokens go and how each is drawn: a preallocated (B, N) long buffer `seq` (the
    prompt, then the new tokens) written at a device-side column, and sample_logits' temperature and top_k,
    the temperature kept on the device. A decoding loop calls it with each step's logits (B, 1, V): nothing
    syncs with the host, no torch.cat grows the output, and all its work can be captured in a CUDA graph
    (GraphedDecodeStep takes a sampler: its replays then draw and write the tokens themselves). `tok`
    (B, 1) holds the last tokens drawn: the next step's input. `n` is the host's count of the column the
    next token goes to (its device copy `col` is what the kernels read)."""

    def __init__(self, seq, start, temperature=1.0, top_k=None, vocab_size=None):
        if seq.dim() != 2 or seq.dtype != torch.long or not 0 <= start <= seq.size(1):
            raise ValueError(f"seq must be a (B, N) long tensor and 0 <= start <= N; got {seq.dtype} "
                             f"{tuple(seq.shape)}, start {start}")
        self.seq = seq
        self.temperature, self.top_k = sampling_params(temperature, top_k, vocab_size or 1 << 62)
        self.temp_t = None if self.temperature is None else \
            torch.tensor(self.temperature, dtype=torch.float32, device=seq.device)
        self.col = torch.tensor(start, dtype=torch.long, device=seq.device)
        self.n = start
        self.tok = seq.new_zeros(seq.size(0), 1)

    def draw(self, logits, fn=sample_logits):
        """The device work alone (what a graph captures): the next tokens into seq[:, col] and tok; col + 1."""
        nxt = fn(logits, self.temp_t, self.top_k)                  # (B, 1)
        self.seq.index_copy_(1, self.col.view(1), nxt)
        self.tok.copy_(nxt)
        self.col.add_(1)
        return nxt

    def check_room(self):
        if self.n >= self.seq.size(1):
            raise RuntimeError(f"the token buffer is full ({self.seq.size(1)} columns)")

    def __call__(self, logits):
        """Draw the next tokens from logits (B, 1, V), eagerly; returns tok (B, 1)."""
        self.check_room()
        self.draw(logits)
        self.n += 1
        return self.tok

    def reset(self, start):
        """Write the next token at column `start` again (a benchmark's repeated runs)."""
        self.n = start
        self.col.fill_(start)


# compile='auto' (generate, sample.py): compiling the graphed step costs a fixed time once per process (and
# per new shape), and saves a fixed time per token, so it pays past COMPILE_COST_S / COMPILE_SAVES_MS tokens.
# Both from results/full/latency.csv (H200; tests/test_model_options.py checks these figures against it):
# COMPILE_COST_S = compiled_build_s of the model's first context there (a fresh process's first compilation,
# the cold one sample.py pays); COMPILE_SAVES_MS = generate_graph_ms_per_token - generate_compiled_ms_per_token
# at context 1024 (generate() with sample.py's sampling, batch 1).
COMPILE_COST_S = {'vanilla': 12.2199, 'delta': 9.25818, 'delta_product': 11.5592, 'nsa': 29.9518}
COMPILE_SAVES_MS = {'vanilla': 0.313192 - 0.190473, 'delta': 0.596136 - 0.232847,
                    'delta_product': 0.724938 - 0.274814, 'nsa': 1.98819 - 0.513558}


def compile_pays(model_type, steps):
    """(compile?, why): whether `steps` graphed decoding steps of this model save more than compiling their
    step costs (COMPILE_COST_S against COMPILE_SAVES_MS a step; a model without measured figures, such as a new
    mechanism, gets the least favourable ones: the largest cost against the smallest saving)."""
    save = COMPILE_SAVES_MS.get(model_type, min(COMPILE_SAVES_MS.values()))
    cost = COMPILE_COST_S.get(model_type, max(COMPILE_COST_S.values()))
    break_even = math.ceil(cost * 1e3 / save)
    pays = steps >= break_even
    return pays, (f"{steps:,} steps {'>=' if pays else '<'} {break_even:,}, where compiling pays for {model_type} "
                  f"(~{cost:.0f} s to compile against {save:.3f} ms saved a step, H200)")


class _Clock:
    """generate()'s stats: seconds between laps, the device synchronised at each; does nothing without stats."""

    def __init__(self, device, stats):
        self.stats, self.cuda = stats, device.type == 'cuda'
        self.t = self._now() if stats is not None else None

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, key):
        if self.stats is not None:
            t = self._now()
            self.stats[key], self.t = t - self.t, t

    def done(self, mode, why, steps, batch):
        if self.stats is None:
            return
        self.lap('decode_s')
        self.stats.setdefault('setup_s', 0.0)
        ms = 1e3 * self.stats['decode_s'] / steps if steps else None
        self.stats.update(mode=mode, why=why, decode_steps=steps, ms_per_token=ms,
                          tokens_per_s=batch * 1e3 / ms if ms else None)


class GraphedDecodeStep:
    """One decoding step -- (B, 1) tokens in, (B, 1, V) logits out, the state advanced -- captured once
    in a CUDA graph and replayed, gpt-fast style: at batch 1 a step is dozens of small kernels per layer,
    and launching them one by one from Python costs more than running them. The state's buffers are
    preallocated and the step indexes them through a device-side position (forward's static_pos), so
    every replay has the same shapes. Replays read and write the very state object, so eager calls (the
    prefill, a re-prefill of a slid window) can run in between. Building it leaves the state as it was
    (the warm-up steps run on it, then it is restored; restore=False skips the copy that takes, as big as
    the state, for a benchmark that doesn't need the state's values). The step runs under the autocast
    context that is active when it is built. Needs model.static_decode (every mixer here has it).
    compile=True captures compiled_static_step() instead: the same step with its small kernels fused by
    torch.compile; if that fails to compile, the constructor raises CaptureError (generate() then decodes
    eagerly).

    sampler (a TokenSampler): the graph also draws the next tokens (sample_logits; compiled_sampler() with
    compile=True), writes them into the sampler's buffer and its `tok`, which is the graph's input, and
    advances the device-side position: a replay is a whole generation step and the host only launches it,
    with no copy or fill in between. The draw uses the default CUDA generator's Philox stream, whose offset
    each replay advances as an eager call would (CUDA graphs register that generator), so a graphed
    generation draws the same noise as an eager one from the same seed.

    dynamic=True marks the batch dimension and the dimensions that grow with the capacity as dynamic for
    torch.compile, so that one compilation serves every batch size (above 1) and context: what a benchmark
    sweeping them needs (without it, each of the first new sizes compiles once more)."""

    # the device a graph runs on, and how it is captured: class attributes so that a CPU test can emulate the
    # capture (a "replay" re-running the captured function) and check this class's bookkeeping without a GPU
    device_type = 'cuda'
    capture = staticmethod(capture_cuda_graph)

    def __init__(self, model, state, warmup=2, compile=False, sampler=None, restore=True, dynamic=False):
        if not model.static_decode:
            raise ValueError(f"{type(model).__module__}: its mixer can't decode with static shapes (static_decode "
                             f"is False), so its steps can't be captured in a CUDA graph; decode eagerly")
        dev = next(model.parameters()).device
        if dev.type != self.device_type:
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {dev}")
        batch = next(iter(state.layers[0].values())).size(0)
        if sampler is not None and (sampler.seq.device != dev or sampler.tok.size(0) != batch):
            raise ValueError(f"the sampler's buffer ({sampler.seq.device}, batch {sampler.tok.size(0)}) must be on "
                             f"the model's device ({dev}) with the state's batch size ({batch})")
        self.model, self.state, self.sampler, self._dynamic = model, state, sampler, dynamic
        # compile: the step under torch.compile (its small kernels fused), captured the same way
        self._fn = functools.partial(compiled_static_step(), model) if compile else model.static_step
        self._sample_fn = compiled_sampler() if compile else sample_logits
        # with a sampler the graph reads the sampler's last tokens, which each replay overwrites with the next
        self.tok = sampler.tok if sampler is not None else torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos_t = torch.zeros((), dtype=torch.long, device=dev)
        self._pos_dev = None  # with a sampler: the position pos_t holds after the last replay (None: unknown)
        self._check_room()
        if dynamic:
            self._mark_dynamic()
        # Under autocast the graph can't use autocast's weight cache (it would record the addresses of
        # copies that die with the context), so each replay would cast every Linear weight again: 25 of
        # vanilla's 145 ops per token. The casts are made once here instead, and the step reads the copies
        # (the same numbers). They are taken now: a step built before the weights change decodes with the
        # old ones. Activations are still cast by autocast, as in any step.
        amp = torch.is_autocast_enabled('cuda')
        self._amp = (lambda: torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False)) \
            if amp else nullcontext
        self._weights = cast_linear_weights(model, torch.get_autocast_dtype('cuda')) if amp else {}
        try:  # the warm-up steps write into the state: keep a copy (as big as the state)
            saved = [{k: t.clone() for k, t in layer.items()} for layer in state.layers] if restore else []
        except torch.OutOfMemoryError as e:
            raise CaptureError(f"no memory for a copy of the decoding state ({first_line(e)})") from e
        pos0 = state.pos
        # (a sampler's tokens and column are a few bytes: always restored)
        tok0, col0 = (sampler.tok.clone(), sampler.n) if sampler is not None else (None, None)

        def undo():  # what a warm-up step changed besides the state's buffers
            state.pos = pos0
            self.pos_t.fill_(pos0)
            if sampler is not None:
                sampler.tok.copy_(tok0)
                sampler.col.fill_(col0)
        self.pos_t.fill_(pos0)
        try:  # (compilation happens in the first warm-up step)
            with torch.no_grad(), torch.cuda.device(dev) if dev.type == 'cuda' else nullcontext(), \
                    _recompile_limit(64) if compile else nullcontext():
                self.graph, self.logits = self.capture(self._step, warmup, after_warmup=undo)
        except torch.OutOfMemoryError as e:  # e.g. in a warm-up step: eager steps may still fit
            raise CaptureError(f"out of memory while capturing ({first_line(e)})") from e
        except CaptureError:
            raise
        except Exception as e:
            if not compile:  # an error of the step itself
                raise
            raise CaptureError(f"torch.compile of the step failed: {type(e).__name__}: {first_line(e)}") from e
        finally:  # also when the capture fails: the caller may go on decoding eagerly from this state
            undo()
            for layer, snap in zip(state.layers, saved):
                for k, t in layer.items():
                    t.copy_(snap[k])

    def _mark_dynamic(self):
        """torch._dynamo.maybe_mark_dynamic on the batch dimension of the input and the state, and on the state
        dimensions that grow with its capacity: those that differ between two states built on the meta
        device (batch 2 capacity 64, batch 3 capacity 96). Sizes 0 and 1 stay specialised (dynamo's rule)."""
        mark = torch._dynamo.maybe_mark_dynamic
        mark(self.tok, 0)
        a, b = (self.model.init_state(*bc, device='meta').layers for bc in ((2, 64), (3, 96)))
        for la, lb, layer in zip(a, b, self.state.layers):
            for k, t in layer.items():
                for d, (x, y) in enumerate(zip(la[k].shape, lb[k].shape)):
                    if x != y:
                        mark(t, d)

    def _step(self):
        with self._amp(), weights_swapped(self.model, self._weights):
            logits = self._fn(self.tok, self.state.layers, self.pos_t)
        if self.sampler is not None:  # the draw, its writes and the next position: in the graph too
            if self._dynamic:
                torch._dynamo.maybe_mark_dynamic(logits, 0)
            self.sampler.draw(logits, self._sample_fn)
            self.pos_t.add_(1)
        return logits

    def _check_room(self):
        st, cfg = self.state, self.model.config
        if st.pos >= st.max_len or (cfg.pos_emb == 'learned' and st.pos >= cfg.block_size):
            raise RuntimeError(f"no room for another token: the state holds {st.pos} of {st.max_len} "
                               f"(block_size {cfg.block_size}, positions {cfg.pos_emb})")

    @torch.no_grad()
    def __call__(self, tok=None):
        """tok (B, 1) -> logits (B, 1, V), in a buffer the next call overwrites; the state advances by one.
        With a sampler, tok may be left out (the step reads the sampler's last tokens), and the replay has
        drawn the next tokens into the sampler (its seq and tok) when this returns."""
        if tok is None and self.sampler is None:
            raise ValueError("tok is needed: this step has no sampler to take its tokens from")
        if tok is not None and tok.shape != self.tok.shape:
            raise ValueError(f"expected tokens of shape {tuple(self.tok.shape)}, got {tuple(tok.shape)}")
        self._check_room()
        if self.sampler is not None:
            self.sampler.check_room()
        if tok is not None and tok is not self.tok:
            self.tok.copy_(tok)
        if self._pos_dev != self.state.pos:  # a sampled replay advances pos_t itself; else fill it each call
            self.pos_t.fill_(self.state.pos)
        self.graph.replay()
        self.state.pos += 1
        if self.sampler is not None:
            self.sampler.n += 1
            self._pos_dev = self.state.pos
        return self.logits


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary(x, pos, theta=10000.0):
    """Rotate x (B, T, H, D) by RoPE at absolute positions pos .. pos+T-1 (GPT-NeoX layout: the two
    halves of the head dim form the pairs); pos an int or a 0-d device tensor (static decoding).
    Angles in fp32 (fp64 for fp64 x); returned in x's dtype. Used by vanilla attention (pos_emb='rope')
    and NSA."""
    B, T, H, D = x.shape
    cdt = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=cdt) / D)  # (D/2,)
    angle = (torch.arange(T, device=x.device, dtype=cdt) + pos)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x.to(cdt).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention through SDPA, with a preallocated static KV cache.
    Options (vanilla's GPTConfig): n_kv_head < n_head is grouped-query attention (n_head / n_kv_head
    query heads share each K/V head; the cache holds n_kv_head heads); head_dim decouples the heads'
    width from n_embd; pos_emb='rope' rotates q and k (the cache holds rotated keys); attn_dropout is
    the dropout on the attention probabilities (default: dropout, as nanoGPT)."""
    static_decode = True
    applies_rope = True  # pos_emb='rope' is implemented here (GPT checks that its mixer has it)

    def __init__(self, config, layer_idx=0):
        super().__init__()
        if not config.head_dim and config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({config.n_kv_head}); valid "
                             f"n_kv_head: 0 (= n_head), {[h for h in range(1, self.n_head + 1) if self.n_head % h == 0]}")
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.rope_theta = config.rope_theta if config.pos_emb == 'rope' else None
        if self.rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"pos_emb='rope' needs an even head_dim (RoPE rotates pairs), got {self.head_dim}")
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        self.c_attn = nn.Linear(config.n_embd, (H + 2 * Hkv) * D, bias=config.bias)  # q, k, v side by side
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.attn_dropout if config.attn_dropout >= 0 else config.dropout

    def forward(self, x, state=None, pos=0):
        B, T, C = x.size()
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.rope_theta is not None:
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        # (B, T, nh, hs) -> (B, nh, T, hs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = {'enable_gqa': True} if Hkv != H else {}  # SDPA broadcasts each K/V head to its query heads
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(pos, torch.Tensor):
            # static one-token step (CUDA graphs): write at the position held by the tensor and attend over
            # the whole preallocated cache, masking the slots past it, so no shape depends on pos
            if T != 1:
                raise ValueError(f"a tensor pos is for one-token steps, got T={T}")
            kc, vc = state['k'], state['v']  # (B, nh, max_len, hs)
            kc.index_copy_(2, pos.view(1), k.to(kc.dtype))
            vc.index_copy_(2, pos.view(1), v.to(vc.dtype))
            mask = (torch.arange(kc.size(2), device=x.device) <= pos)[None, :]  # (1, max_len): (q, keys)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, **gqa)
        elif state is None or pos == 0:
            # training, or a prefill from an empty cache: plain causal attention over x alone
            if state is not None:
                state['k'][:, :, :T] = k
                state['v'][:, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        else:
            kc, vc = state['k'], state['v']  # (B, nh, max_len, hs)
            end = pos + T
            if end > kc.size(2):
                raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {kc.size(2)}")
            kc[:, :, pos:end] = k
            vc[:, :, pos:end] = v
            # query i (absolute position pos+i) sees keys 0..pos+i
            mask = torch.arange(end, device=x.device)[None, :] <= (pos + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask, **gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    def init_state(self, batch_size, max_len, device, dtype):
        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)
        return {'k': torch.zeros(shape, device=device, dtype=dtype),
                'v': torch.zeros(shape, device=device, dtype=dtype)}

    def flops_per_token(self, T):
        # QK^T and AV, counted over the full T x T square like nanoGPT/PaLM (not halved for causality)
        return 2 * 2 * self.n_head * self.head_dim * T


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        d_ff = config.d_ff or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, d_ff, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block around any token mixer."""

    def __init__(self, config, mixer_cls, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.mixer = mixer_cls(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        # mlp=False: the state mixer is the identity, as Zoology builds its no-MLP models (its block returns
        # norm2(residual) where the MLP's output would be), so the block adds ln_2(x) instead of mlp(ln_2(x))
        self.mlp = MLP(config) if config.mlp else nn.Identity()

    def forward(self, x, state=None, pos=0):
        x = x + self.mixer(self.ln_1(x), state, pos)
        x = x + self.mlp(self.ln_2(x))
        return x


D_FF_HELP = ("MLP hidden width; 0: 4 * n_embd; -1: solved so total parameters match vanilla's within 3% "
             "(an error names widths that would, where it can't); a width given turns matching off")


def setting(default, meaning):
    """A config field with its one-line meaning: `train_runner.py --help` and docs/configuration.md show it."""
    return field(default=default, metadata={'help': meaning})


def config_help(config_cls):
    """{field: meaning} of a GPTConfig class (a subclass's own meaning wins where it redefines a field)."""
    return {f.name: f.metadata.get('help', '') for f in fields(config_cls)}


@dataclass
class BaseConfig:
    """The skeleton's keys, shared by every model; each model file's GPTConfig adds its mixer's."""
    model_type: str = setting('vanilla', "the token mixer: " + ', '.join(MODEL_TYPES))
    block_size: int = setting(256, "training context length (and the learned position table's size)")
    vocab_size: int = setting(65, "vocabulary size (train_runner takes the dataset's or the task's)")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads (n_embd must be divisible by it unless head_dim is given)")
    n_embd: int = setting(384, "residual stream width")
    d_ff: int = setting(0, D_FF_HELP)
    dropout: float = setting(0.0, "dropout on embeddings, residual branches and the MLP (and vanilla's attention "
                                  "probabilities); train_runner's default: 0.2, nanoGPT's shakespeare_char")
    bias: bool = setting(False, "bias in Linears and LayerNorms (nanoGPT's shakespeare_char uses False)")
    pos_emb: str = setting('learned', "'learned' (absolute, GPT-2), 'none' (the mixer encodes position itself) "
                                      "or 'rope' (rotary, applied by a mixer that has it: vanilla attention)")
    mlp: bool = setting(True, "False: no MLP, the identity state mixer (Zoology's MQAR models); d_ff is not solved")
    embd_dropout: float = setting(-1.0, "dropout on the embeddings; < 0: dropout")
    loss_positions: int = setting(0, "0: the training loss over every position; K: each row's K targets (the "
                                     "positions not -100, which must be at most K) alone through the LM head, the "
                                     "same loss; the mqar task sets num_kv_pairs")


@dataclass
class GPTConfig(BaseConfig):
    """Vanilla attention's config: the skeleton's keys plus the attention mixer's options."""
    model_type: str = setting('vanilla', "the token mixer: " + ', '.join(MODEL_TYPES))
    n_kv_head: int = setting(0, "K/V heads: 0: n_head (multi-head); fewer: grouped-query attention")
    head_dim: int = setting(0, "per-head width: 0: n_embd // n_head")
    attn_dropout: float = setting(-1.0, "dropout on the attention probabilities; < 0: dropout (nanoGPT)")
    rope_theta: float = setting(10000.0, "RoPE base, with pos_emb='rope'")


# a tiny configuration of this model, for tests and smoke runs (each model file has one)
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)


class GPT(nn.Module):
    mixer_cls = CausalSelfAttention   # the only thing a model file overrides
    # why torch.compile must not be used on this model (None: it can be); train_runner and bench then
    # run it eagerly and print the reason
    compile_problem = None

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        valid_pos = ('learned', 'none') + (('rope',) if getattr(self.mixer_cls, 'applies_rope', False) else ())
        if config.pos_emb not in valid_pos:
            raise ValueError(f"pos_emb must be one of {', '.join(map(repr, valid_pos))} for model_type "
                             f"{config.model_type!r}, got {config.pos_emb!r}" + ('' if 'rope' in valid_pos else
                             " ('rope' is vanilla attention's; NSA applies RoPE itself, with pos_emb 'none')"))
        if getattr(config, 'head_dim', None) == 0:  # 0 -> n_embd // n_head, for any mixer with a head_dim
            if config.n_embd % config.n_head:
                raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                                 f"(head_dim=0 means n_embd // n_head)")
            config.head_dim = config.n_embd // config.n_head
        if not config.mlp and config.d_ff > 0:
            raise ValueError(f"d_ff={config.d_ff} with mlp=False: a model without MLP has no d_ff (leave it 0 or -1)")
        if config.d_ff < 0 and config.mlp:  # without an MLP there is no width to solve
            config.d_ff = solve_d_ff(config, type(self))
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == 'learned' else None,
            drop=nn.Dropout(config.dropout if config.embd_dropout < 0 else config.embd_dropout),
            h=nn.ModuleList([Block(config, self.mixer_cls, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        self.apply(self._init_weights)
        # GPT-2: scaled init of the projections that write into the residual stream
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.transformer.h:
            if hasattr(block.mixer, 'post_init'):
                block.mixer.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------- sizes
    def get_num_params(self, non_embedding=True):
        """Trainable parameters. Like nanoGPT, non_embedding=True leaves out the learned position
        table; the token embedding stays, since it is also the (tied) LM head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def max_context(self):
        """Longest context the model can attend to: block_size with a learned position table,
        else None (unbounded: recurrent state, or positions encoded inside the mixer)."""
        return self.config.block_size if self.config.pos_emb == 'learned' else None

    def flops_per_token(self, T=None):
        """Training FLOPs (fwd+bwd) per token at context T: 6N plus 3x the mixers' extra forward FLOPs."""
        T = T or self.config.block_size
        mix = sum(block.mixer.flops_per_token(T) for block in self.transformer.h)
        return 6 * self.get_num_params() + 3 * mix

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, T=None):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (the device's measured bf16 peak)."""
        T = T or self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak_flops

    # ----------------------------------------------------------------------------- forward
    def forward(self, idx, targets=None, state=None, last_only=False, static_pos=None):
        """idx (B, T) -> (logits, loss). logits are (B, T, V), or (B, 1, V) with last_only, or (B, K, V) at the
        target positions with targets and config.loss_positions = K.
        With a DecodeState, idx continues the sequence the state holds, and the state advances.
        static_pos: for a one-token step that a CUDA graph can capture (see GraphedDecodeStep), a 0-d
        long tensor equal to state.pos, which the mixers then read instead of the Python int."""
        B, T = idx.size()
        pos = state.pos if state is not None else 0
        if self.transformer.wpe is not None and pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size {self.config.block_size} "
                             f"(learned positions); crop it, as generate() does")
        layer_states = state.layers if state is not None else [None] * len(self.transformer.h)
        if static_pos is not None:
            if state is None or T != 1 or not self.static_decode:
                raise ValueError("static_pos is for one-token steps with a state, on a model whose mixers all "
                                 f"support static decoding (this one: {self.static_decode})")
            logits = self.static_step(idx, layer_states, static_pos)
        else:
            x = self._trunk(idx, layer_states, pos)
            if last_only:
                x = x[:, -1:, :]
            elif targets is not None and self.config.loss_positions:
                # the LM head at each row's K target positions alone (MQAR: kv queries of L tokens; the head
                # and the loss over a vocabulary of 8192 at every position cost more than the whole mixer):
                # topk of a 0/1 mask finds them with a static shape (no host sync, graph-capturable)
                at = (targets != -100).float().topk(self.config.loss_positions, dim=1, sorted=False).indices
                x = x.gather(1, at[..., None].expand(-1, -1, x.size(-1)))  # (B, K, C)
                targets = targets.gather(1, at)                           # (B, K)
            logits = self.lm_head(self.transformer.ln_f(x))
        if state is not None:
            state.pos += T
        loss = None
        if targets is not None:
            # targets of -100 are ignored (PyTorch's default): the examples-based tasks mark positions with no
            # target so (tasks.py); the mean is over the other targets
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _trunk(self, idx, layer_states, pos):
        """idx (B, T) -> the last block's output (B, T, C); pos: an int, or a 0-d tensor (static step)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            T = idx.size(1)
            positions = pos.view(1) if isinstance(pos, torch.Tensor) else \
                torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block, s in zip(self.transformer.h, layer_states):
            x = block(x, s, pos)
        return x

    def static_step(self, idx, layer_states, pos):
        """The static one-token step: idx (B, 1) -> logits (B, 1, V), advancing the per-layer states
        in place at the 0-d long tensor pos. It reads no Python position, so no shape, branch or guard
        depends on where the sequence is: what a CUDA graph captures and torch.compile compiles once."""
        x = self._trunk(idx, layer_states, pos)[:, -1:, :]  # a slice: x[:, [-1]] would copy a host tensor
        return self.lm_head(self.transformer.ln_f(x))

    # ----------------------------------------------------------------------------- decoding
    @property
    def static_decode(self):
        """Whether one-token steps can be captured in a CUDA graph (every mixer supports it)."""
        return all(getattr(blk.mixer, 'static_decode', False) for blk in self.transformer.h)

    def init_state(self, batch_size, max_len, device=None, dtype=None):
        """A fresh DecodeState for sequences of up to max_len tokens. dtype is the activations'
        dtype (KV caches use it; recurrent states keep fp32 inside the mixer)."""
        p = next(self.parameters())
        device = device if device is not None else p.device
        dtype = dtype if dtype is not None else p.dtype
        layers = [blk.mixer.init_state(batch_size, max_len, device, dtype) for blk in self.transformer.h]
        return DecodeState(layers, max_len)

    def decode_state_bytes(self, batch_size, context_len, dtype=torch.bfloat16):
        """Bytes the decoding state takes at this context (built on the meta device: nothing allocated)."""
        return self.init_state(batch_size, context_len, device='meta', dtype=dtype).nbytes()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, cuda_graph='auto',
                 compile='auto', stats=None):
        """Sample max_new_tokens tokens after idx (B, T) -> (B, T + max_new_tokens). temperature=0 (or
        top_k=1) is greedy. Each token is drawn on the device (sample_logits: top-k, temperature and an
        exponential race) into a preallocated buffer (TokenSampler), so the loop never waits for the device.

        cuda_graph: with the cache on CUDA, replay one-token steps from a CUDA graph (GraphedDecodeStep),
        the draw inside the graph; 'auto' = when the model supports it (static_decode), True = required,
        False = eager steps.
        compile: the graphed step (and the draw) under torch.compile: fewer, fused kernels per token, but
        the first use in a process compiles for tens of seconds. 'auto' = when the steps asked for pay for
        that (compile_pays: the compilation's estimated cost against this model's measured saving per
        step); True / False = always / never.
        stats: a dict to fill with how the generation ran and what its parts took (it synchronises the
        device at their boundaries: pass one to measure): mode ('compiled graph', 'graph', 'eager' or
        'no cache'), why (the reason for that mode), prefill_s (the prompt's forward and the first new
        token), setup_s (building the graph, any compilation included), decode_s and decode_steps (every
        later token, one step each), ms_per_token (decode_s / decode_steps) and tokens_per_s (B tokens a step).

        Long prompts: a model with learned positions (max_context = block_size) conditions on the
        last block_size tokens only, nanoGPT's sliding window. With the cache, once the window is
        full every new token slides it and re-prefills it (the position table has no slot past
        block_size), so cached and uncached decoding compute the same function. Models without
        learned positions condition on the whole sequence, with a state sized for it.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1 prompt tokens, got shape {tuple(idx.shape)}")
        if cuda_graph not in ('auto', True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if compile not in ('auto', True, False):
            raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
        if cuda_graph is True and not (idx.is_cuda and self.static_decode):
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device whose steps are static "
                             f"(device {idx.device.type}, static_decode {self.static_decode}); use 'auto' or False")
        if compile is True and not (use_cache and cuda_graph and idx.is_cuda and self.static_decode):
            raise ValueError(f"compile=True compiles the CUDA-graph decoding step: it needs use_cache=True, "
                             f"cuda_graph 'auto' or True and a CUDA model with static steps (device "
                             f"{idx.device.type}, use_cache {use_cache}, cuda_graph {cuda_graph!r})")
        B, T0 = idx.shape
        seq = idx.new_empty(B, T0 + max_new_tokens)  # the prompt, then the new tokens as they are drawn
        seq[:, :T0] = idx
        sampler = TokenSampler(seq, T0, temperature, top_k, self.config.vocab_size)  # (checks both)
        clock = _Clock(idx.device, stats)
        ctx = self.max_context
        crop = (lambda s: s) if ctx is None else (lambda s: s[:, -ctx:])
        if max_new_tokens == 0:
            return seq
        if not use_cache:
            for i in range(max_new_tokens):
                sampler(self(crop(seq[:, :T0 + i]), last_only=True)[0])
                if i == 0:
                    clock.lap('prefill_s')
            clock.done('no cache', 'use_cache=False: a full forward per token', max_new_tokens - 1, B)
            return seq
        total = T0 + max_new_tokens
        dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else None
        state = self.init_state(B, total if ctx is None else min(total, ctx), dtype=dtype)
        sampler(self(crop(idx), state=state, last_only=True)[0])  # prefill, and the first new token
        clock.lap('prefill_s')
        steps = max_new_tokens - 1
        mode, why = 'eager', None
        if not (cuda_graph and idx.is_cuda and self.static_decode):
            why = ('cuda_graph=False' if not cuda_graph else 'no CUDA' if not idx.is_cuda
                   else 'static_decode is False') + ': eager steps'
        elif steps == 0 or (ctx is not None and state.pos >= ctx):
            why = 'no step to graph' if steps == 0 else 'the window is full (every token re-prefills it)'
        else:
            use_compile, why = compile_pays(self.config.model_type, steps) if compile == 'auto' else \
                (compile, f'compile={compile}')
            try:
                graphed = GraphedDecodeStep(self, state, compile=use_compile, sampler=sampler)
                mode = 'compiled graph' if use_compile else 'graph'
            except CaptureError as e:
                if cuda_graph is True:
                    raise
                print(f"generate: CUDA-graph capture failed ({e}); decoding eagerly")
                why = f'capture failed ({first_line(e, 150)}): eager steps'
        clock.lap('setup_s')
        for i in range(1, max_new_tokens):
            if ctx is not None and state.pos >= ctx:  # window full: slide it and re-prefill
                state.reset()
                sampler(self(crop(seq[:, :T0 + i]), state=state, last_only=True)[0])
            elif mode != 'eager':
                graphed()                 # one replay: the step, the draw, the writes
            else:
                sampler(self(sampler.tok, state=state, last_only=True)[0])
        clock.done(mode, why, steps, B)
        return seq

    # ----------------------------------------------------------------------------- training
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (>= 2D) except parameters flagged _no_weight_decay.
        Fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and not getattr(p, '_no_weight_decay', False)]
        no_decay = [p for p in params if not (p.dim() >= 2 and not getattr(p, '_no_weight_decay', False))]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if use_fused else {}))
