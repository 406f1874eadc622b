"""Where a profiled step's GPU time goes, by kind of kernel: sums the kernel table of a `bench.py profile`
output (profile_<model>_<mode>.txt, which lists the top 20 kernels) into a few groups and reports the
rest of the GPU time (kernels below the top 20) as one line. The groups are matched on kernel names:

    python tools/profile_breakdown.py results/training-profiles/fla-short-conv/profile_delta_train.txt
"""
import re
import sys

GROUPS = [  # (group, regex on the kernel name); the first match wins
    ("short conv (fla causal_conv1d, or PyTorch's depthwise conv)", r'causal_conv1d|conv_depthwise'),
    ('delta rule (fla chunk kernels)', r'prepare_wy|merge_16x16|recompute_w_u|^chunk_|wy_fast|solve_tril'),
    ('TileLang kernels (fla backward on Hopper)', r'^kernel_kernel'),
    ('attention (SDPA, fla parallel_attn / parallel_nsa, top-k sort)', r'sdpa|flash|fmha|parallel_attn|parallel_nsa|radixSort'),
    ('matmul (cuBLAS / nvjet / cutlass)', r'nvjet|gemm|gemv|cutlass|splitKreduce|sgemm'),
    ('optimizer (AdamW, grad norm)', r'Optimizer|multi_tensor_apply|foreach'),
    ('norms (LayerNorm / RMSNorm)', r'layer_norm|GammaBeta|rms'),
    ('elementwise, reductions, casts and copies', r'.'),
]


def breakdown(path):
    with open(path) as f:
        lines = f.read().splitlines()
    head = lines[0]
    total = float(re.search(r'GPU kernels ([\d.]+) ms', head).group(1))
    sums, listed = {g: [0.0, 0] for g, _ in GROUPS}, 0.0
    for line in lines[3:]:
        m = re.match(r'(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', line)
        if not m:
            break  # end of the kernel table
        name, ms, calls = m.group(1), float(m.group(2)), float(m.group(3))
        if name.startswith('Optimizer.step'):
            continue  # a profiler range around the optimizer's kernels, not a kernel: counted below
        group = next(g for g, rx in GROUPS if re.search(rx, name))
        sums[group][0] += ms
        sums[group][1] += calls
        listed += ms
    print(head)
    for g, (ms, calls) in sums.items():
        if calls:
            print(f"  {ms:7.3f} ms  {calls:6.0f} launches  {g}")
    print(f"  {max(total - listed, 0.0):7.3f} ms           kernels below the top 20")  # the table rounds to 1 us
    print(f"  {total:7.3f} ms           GPU kernel time in all")


if __name__ == '__main__':
    for p in sys.argv[1:]:
        breakdown(p)
