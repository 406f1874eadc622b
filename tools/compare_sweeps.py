"""Best validation loss of every run in four executions of the 12-run sweep on the H200 (the same runs,
seeds and training code: two on one GPU, two with --gpus=2), and the largest difference between each pair:
how far GPU training reproduces from one execution to the next. Produces
results/sweep-repeatability/compare_sweeps.txt.

    python tools/compare_sweeps.py > results/sweep-repeatability/compare_sweeps.txt
"""
import itertools
import json
import os

SWEEPS = {  # label -> runs folder, relative to the repository root
    'results/full (2 GPUs, c063549 + c5620e8)': 'results/full/runs',
    '1 GPU, resumed (c063549)': 'results/sweep-repeatability/one-gpu-resumed/runs',
    '1 GPU, uninterrupted (9a2081a)': 'results/sweep-repeatability/one-gpu-timed/runs',
    '2 GPUs, uninterrupted (9a2081a)': 'results/sweep-repeatability/two-gpus-timed/runs',
}
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
loss = {}
for label, d in SWEEPS.items():
    for run in sorted(os.listdir(os.path.join(root, d))):
        p = os.path.join(root, d, run, 'summary.json')
        if os.path.exists(p):  # a run that did not finish has no summary
            with open(p) as f:
                loss[label, run] = json.load(f)['best_val_loss']
runs = sorted({r for _, r in loss})
labels = list(SWEEPS)
print('| run | ' + ' | '.join(labels) + ' |')
print('|---|' + '---|' * len(labels))
for r in runs:
    print(f'| {r} | ' + ' | '.join(f"{loss[a, r]:.4f}" if (a, r) in loss else '-' for a in labels) + ' |')
print()
for a, b in itertools.combinations(labels, 2):
    common = [r for r in runs if (a, r) in loss and (b, r) in loss]
    diff = max(abs(loss[a, r] - loss[b, r]) for r in common)
    print(f"- {a} vs {b}: largest |difference| {diff:.4f} over {len(common)} runs")
