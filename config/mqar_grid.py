# The MQAR grid of the reproduction (train_runner.py's 'mqar' stage): Zoology's Figure 2 as a list of runs,
# each a dict of keys over config/mqar.py (its per_model entry applies first) and `name`, the run's folder
# under results/mqar/runs/. A grid file is plain Python like a config file: `base` and `runs`.
#
#   settings (L, kv) in (64, 4), (128, 8), (256, 16), (512, 64) x d_model {64, 128, 256} x the four mixers x
#   LR {1e-4, 4.64e-4, 2.15e-3, 1e-2}, seed 1337: 192 runs; and seeds 1338, 1339 of every mixer and LR at
#   (512, 64), d_model 128 (the spread over 3 seeds, with the 1337 run of the grid): 32 more. 224 runs.
base = 'config/mqar.py'

_settings = [(64, 4), (128, 8), (256, 16), (512, 64)]
_widths = [64, 128, 256]
_models = ['vanilla', 'delta', 'delta_product', 'nsa']
_lrs = [1e-4, 4.64e-4, 2.15e-3, 1e-2]


def _run(m, d, L, kv, lr, seed):
    keys = dict(model_type=m, n_embd=d, seq_len=L, num_kv_pairs=kv, learning_rate=lr, seed=seed,
                batch_size=512 if L <= 128 else 256 if L == 256 else 128)  # Zoology's batch per L
    if m == 'nsa':  # config/mqar.py's NSA layout is set for L = 512: blocks and window at L / 8 and L / 4
        keys.update(nsa_block_size=max(16, L // 8), nsa_window_size=L // 4)
    return dict(name=f"{m}-d{d}-L{L}-kv{kv}-lr{lr:g}-s{seed}", **keys)


runs = ([_run(m, d, L, kv, lr, 1337) for (L, kv) in _settings for d in _widths for m in _models for lr in _lrs]
        + [_run(m, 128, 512, 64, lr, s) for s in (1338, 1339) for m in _models for lr in _lrs])
