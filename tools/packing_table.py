"""Runs trained one at a time against the same runs sharing one GPU (two mqar-stage folders of one grid, e.g.
--grids_dir=<dir>/alone and --grids_dir=<dir>/shared --procs_per_gpu=N): a markdown table of each run's
median ms/iter, wall time and best test accuracy (its summary.json), each run's eval timeline (time_s of
its metrics.jsonl evals), each stage's wall time (reproduction.json), and the steady-state gain of the runs
that overlapped on the GPU, sum of (ms alone / ms shared) over them:

    python tools/packing_table.py results/mqar-packing
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from report import load_runs  # noqa: E402


def runs(folder):
    """{run name: (summary, [eval records])} of <folder>/mqar/runs, in the report's model order."""
    return {r['name']: (r['summary'], r['evals']) for r in load_runs(os.path.join(folder, 'mqar', 'runs'))[0]}


def main(root):
    alone, shared = runs(os.path.join(root, 'alone')), runs(os.path.join(root, 'shared'))
    print("| model | ms/iter alone | ms/iter shared | shared / alone | wall s alone | wall s shared "
          "| test acc alone | test acc shared |")
    print("|---|---|---|---|---|---|---|---|")
    for name in alone:
        a, s = alone[name][0], shared[name][0]
        print(f"| {a['model_type']} | {a['median_ms_per_iter']:.2f} | {s['median_ms_per_iter']:.2f} "
              f"| {s['median_ms_per_iter'] / a['median_ms_per_iter']:.2f} | {a['wall_s']:.1f} | {s['wall_s']:.1f} "
              f"| {a['best_test_acc']:.4f} | {s['best_test_acc']:.4f} |")
    print()
    for label, rs in (('alone', alone), ('shared', shared)):
        with open(os.path.join(root, label, 'mqar', 'reproduction.json')) as f:
            print(f"{label}: stage {json.load(f)['wall_s']:.0f} s")
        for name, (s, evals) in rs.items():
            print(f"  {s['model_type']}: evals at (iter, time_s, val_loss) "
                  + ', '.join(f"({e['iter']}, {e['time_s']:.1f}, {e['val_loss']:.4f})" for e in evals))
    # runs that trained while another was still in its steady state: those whose shared step is slower
    over = [n for n in alone if shared[n][0]['median_ms_per_iter'] > 1.05 * alone[n][0]['median_ms_per_iter']]
    gain = sum(alone[n][0]['median_ms_per_iter'] / shared[n][0]['median_ms_per_iter'] for n in over)
    print(f"\nsteady state: {len(over)} runs slowed by sharing; the work of {gain:.2f} alone steps per shared step")


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'results/mqar-packing')
