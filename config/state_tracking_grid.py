# The state-tracking grid of the reproduction (train_runner.py's 'state_tracking' stage): every variant of
# DeltaProduct's and Grazzi et al.'s comparisons on Z2 (parity) and S3, 3 seeds, each a dict of keys over
# config/state_tracking.py (train at T = 128, test at 128, 256, 512) and `name`, the run's folder under
# results/state_tracking/runs/. A grid file is plain Python like a config file: `base` and `runs`.
#
#   delta            beta in (0, 1) ([0, 1] eigenvalues) and (0, 2) (allow_neg_eigval: [-1, 1])
#   delta_product    n_h in {1, 2, 3}, each with [0, 1] and [-1, 1]
#   vanilla          RoPE (learned positions can't reach the test lengths past 128)
#   nsa              its own RoPE
# 10 variants x 2 groups x 3 seeds = 60 runs. A5 and S5 are served by the task too: add them to _groups.
base = 'config/state_tracking.py'

_groups = ['Z2', 'S3']
_seeds = [1337, 1338, 1339]
_variants = ([('delta' + ('[-1,1]' if neg else '[0,1]'), dict(model_type='delta', allow_neg_eigval=neg))
              for neg in (False, True)]
             + [(f"delta_product{n}" + ('[-1,1]' if neg else '[0,1]'),
                 dict(model_type='delta_product', num_householder=n, allow_neg_eigval=neg))
                for n in (1, 2, 3) for neg in (False, True)]
             + [('vanilla(rope)', dict(model_type='vanilla', pos_emb='rope')), ('nsa', dict(model_type='nsa'))])

runs = [dict(name=f"{g}-{v.replace('[-1,1]', '-neg').replace('[0,1]', '-pos').replace('(rope)', '-rope')}-s{s}",
             group=g, seed=s, **keys)
        for g in _groups for v, keys in _variants for s in _seeds]
