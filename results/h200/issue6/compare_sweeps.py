"""Best validation loss of every run in the four executions of the 12-run sweep on the H200 (the same
runs and seeds: two on one GPU, two with --gpus=2), and the largest difference between each pair.

    python results/h200/issue6/compare_sweeps.py > results/h200/issue6/compare_sweeps.txt
"""
import itertools
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEPS = {  # label -> runs folder, relative to the repository root
    '2 GPUs, third session (results/full)': 'results/full/runs',
    '1 GPU, third session (resumed across calls)': 'results/h200/issue6/sweep_1gpu/runs',
    '1 GPU, fourth session (uninterrupted)': 'results/h200/issue6/sweep_timed_1gpu/runs',
    '2 GPUs, fourth session (uninterrupted)': 'results/h200/issue6/sweep_timed_2gpu/runs',
}
root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
loss = {}
for label, d in SWEEPS.items():
    for run in sorted(os.listdir(os.path.join(root, d))):
        p = os.path.join(root, d, run, 'summary.json')
        if os.path.exists(p):
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
