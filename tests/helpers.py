"""Small helpers shared by the test modules."""

import torch


def unit_scale_(module, seed):
    """A module's weights at unit scale (std 1/sqrt(fan_in); a short conv's K taps std 1/sqrt(K)) and its
    norm weights away from 1 (U[0.5, 1.5]), so that every weight moves the output and attention is far from
    uniform, unlike at GPT-2's 0.02 init, where a wrong block choice or window barely moves the logits.
    Other 1-D parameters (biases, A_log, dt_bias) keep their values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif name.endswith('norm.weight'):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return module


def unit_scale_mixers_(gpt, seed=0):
    """unit_scale_ on every block's token mixer of a GPT (embeddings, MLPs and norms keep GPT-2's init)."""
    for i, block in enumerate(gpt.transformer.h):
        unit_scale_(block.mixer, seed + i)
    return gpt


def mixer_grad_errors(a, b, rel_rms):
    """{parameter name: rel RMS of a's gradient against b's} for the token mixers' parameters of two GPTs
    with the same architecture."""
    pb = dict(b.named_parameters())
    return {n: rel_rms(p.grad, pb[n].grad) for n, p in a.named_parameters() if '.mixer.' in n}
