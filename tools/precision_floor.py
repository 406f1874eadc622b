"""How far fla's kernels are from fp32 against how far bf16 rounding alone takes the torch reference (CUDA).

    python tools/precision_floor.py gdp|delta|nsa_det

gdp / delta: the whole tiny test model (its mixers at unit scale, as the model-level CUDA tests build it), one
forward and backward four ways: fla under bf16 autocast, the torch backend under bf16 autocast, the torch
backend in fp32 (TF32 off), fla without autocast. Prints each mixer parameter's gradient error (relative RMS)
of fla16 and of torch16 against fp32, of fla16 against torch16, and of fla without autocast against fp32: the
kernel's error beside the bf16 floor. nsa_det: whether two backward passes on identical inputs give bitwise
equal gradients (NSA's unit-scale test model, then vanilla, DeltaNet and Gated DeltaProduct at GPT-2 init).
results/cuda-tests/e4f0c43/ holds its output on the H200."""
import sys, os, json
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, 'tests'))
import torch
import model as model_lib
from helpers import unit_scale_mixers_, mixer_grad_errors
rel = model_lib.rel_rms
what = sys.argv[1]

def run(m, idx, tgt, autocast):
    m.zero_grad(set_to_none=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            _, loss = m(idx, tgt)
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return loss.item()

def compare(build, idx, tgt):
    out = {}
    ms = {}
    for name, backend, ac in (('fla_bf16', 'fla', True), ('torch_bf16', 'torch', True), ('torch_fp32', 'torch', False), ('fla_fp32in', 'fla', False)):
        m = build(backend).cuda().train()
        out[name + '_loss'] = run(m, idx, tgt, ac)
        ms[name] = m
    e1 = mixer_grad_errors(ms['fla_bf16'], ms['torch_fp32'], rel)
    e2 = mixer_grad_errors(ms['torch_bf16'], ms['torch_fp32'], rel)
    e3 = mixer_grad_errors(ms['fla_bf16'], ms['torch_bf16'], rel)
    e4 = mixer_grad_errors(ms['fla_fp32in'], ms['torch_fp32'], rel)
    print(json.dumps({k: v for k, v in out.items()}))
    print(f"{'param':45s} {'fla16/t32':>10s} {'t16/t32':>10s} {'fla16/t16':>10s} {'fla(no ac)/t32':>14s}")
    for n in e1:
        print(f"{n:45s} {e1[n]:10.4f} {e2[n]:10.4f} {e3[n]:10.4f} {e4[n]:14.4f}")

if what == 'gdp':
    from test_delta_product import tiny_model, GPU_SHAPES
    idx = torch.randint(0, 65, (4, 200), generator=torch.Generator().manual_seed(0)).cuda()
    compare(lambda b: unit_scale_mixers_(tiny_model(torch.float32, backend=b, **GPU_SHAPES)), idx, idx)
    print('--- neg eigval ---')
    compare(lambda b: unit_scale_mixers_(tiny_model(torch.float32, backend=b, allow_neg_eigval=True, **GPU_SHAPES)), idx, idx)
elif what == 'delta':
    import model_delta as md
    torch.manual_seed(0)
    idx = torch.randint(0, 65, (4, 512), device='cuda'); tgt = torch.randint(0, 65, (4, 512), device='cuda')
    def b(backend):
        torch.manual_seed(0)
        return unit_scale_mixers_(md.GPT(md.GPTConfig(**md.TINY, backend=backend)))
    compare(b, idx, tgt)
elif what == 'nsa_det':
    from test_nsa import unit_scale_tiny
    m = unit_scale_tiny('auto').cuda()
    idx = torch.randint(0, 65, (4, 128), generator=torch.Generator().manual_seed(1)).cuda()
    gs = []
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        gs.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in gs[0]:
        d = [(gs[0][n] - g[n]).abs().max().item() for g in gs[1:]]
        print(f"{n:45s} bitwise-equal={all(x == 0 for x in d)} maxdiff={max(d):.3e} rel={rel(gs[1][n], gs[0][n]):.2e}")
    for mt in ('vanilla', 'delta', 'delta_product'):
        torch.manual_seed(0)
        mm = model_lib.build_model(mt, n_layer=2, dropout=0.0).cuda()
        X = torch.randint(65, (8, 256), device='cuda')
        gg = []
        for _ in range(2):
            mm.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = mm(X, X)[1]
            loss.backward()
            gg.append(torch.cat([p.grad.flatten() for p in mm.parameters() if p.grad is not None]))
        print(mt, 'bitwise-equal grads across two backward passes:', torch.equal(gg[0], gg[1]), (gg[0]-gg[1]).abs().max().item())
else:
    raise SystemExit(f"usage: python tools/precision_floor.py gdp|delta|nsa_det (got {what!r})")
