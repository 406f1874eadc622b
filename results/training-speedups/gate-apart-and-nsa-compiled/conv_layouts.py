"""What fla's conv kernels get in DeltaNet's and Gated DeltaProduct's training step, eager and compiled (shape,
strides, dtypes, 16-byte alignment of x and dy), and each of those layouts' conv fwd+bwd time alone.
From the repository root on a CUDA machine: python3 results/training-speedups/gate-apart-and-nsa-compiled/conv_layouts.py"""
import sys, torch
sys.path.insert(0, '.')
import model
from fla.modules.causal_conv1d import ops as cops
seen = []
F0, B0 = cops.CausalConv1dFunction.forward, cops.CausalConv1dFunction.backward
def desc(t):
    return (tuple(t.shape), t.stride(), str(t.dtype)[6:], t.data_ptr() % 16) if t is not None else None
def fwd(ctx, x, weight, *a, **k):
    seen.append(('fwd', desc(x), desc(weight))); return F0(ctx, x, weight, *a, **k)
def bwd(ctx, dy, *a):
    seen.append(('bwd', desc(dy), desc(ctx.saved_tensors[0]))); return B0(ctx, dy, *a)
cops.CausalConv1dFunction.forward, cops.CausalConv1dFunction.backward = staticmethod(fwd), staticmethod(bwd)
for mt in ('delta', 'delta_product'):
    torch.manual_seed(0)
    m = model.build_model(mt, block_size=256).cuda()
    X = torch.randint(0, m.config.vocab_size, (64, 256), device='cuda')
    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = m(X, X)[1]
        loss.backward()
    for name, f in (('eager', step), ('compiled', torch.compile(step))):
        seen.clear(); f(); f(); torch.cuda.synchronize()
        print(mt, name, *sorted(set(map(str, seen))), sep='\n  ')
        if name == 'eager':
            W = next(e for e in seen if e[0] == 'fwd')[1][1][1]  # x's row stride as eager passes it
    # the conv alone in the layouts seen: x a strided slice (as eager) or contiguous, fwd+bwd, ms
    C = m.transformer.h[0].mixer._convs
    C = sum(c.weight.size(0) for c in C)
    import fla_ops
    w = torch.randn(C, 4, device='cuda')
    dy = torch.randn(64, 256, C, device='cuda', dtype=torch.bfloat16)
    for layout in ('slice', 'contiguous'):
        base = torch.randn(64, 256, W if layout == 'slice' else C, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        xx = base[..., :C]
        run = lambda: torch.autograd.grad(fla_ops.causal_conv1d_silu(xx, w), [base], dy)  # noqa: E731
        for _ in range(3): run()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(50): run()
        e1.record(); torch.cuda.synchronize()
        print(mt, f"conv fwd+bwd alone, x {layout} {tuple(xx.shape)} stride {xx.stride()}: {e0.elapsed_time(e1) / 50:.3f} ms")
