"""One CPU-preset run of the reproduction (lr 1e-3, dropout 0, seed 1337) at one torch thread, with the
train_runner of the current directory; prints its summary's times."""
import json, sys, time
sys.path.insert(0, '.')
import torch
import train_runner
torch.set_num_threads(1)
mt, out = sys.argv[1], sys.argv[2]
P = train_runner.PRESETS['cpu']
cfg = {**P['train'], **P['models'].get(mt, {}), 'model_type': mt, 'learning_rate': 1e-3, 'dropout': 0.0,
       'seed': 1337, 'out_dir': out, 'preset': 'cpu', 'device': 'cpu'}
t0 = time.time()
s = train_runner.train(None, cfg)
print('AB', json.dumps({'model': mt, 'process_s': round(time.time() - t0, 2), **{k: s[k] for k in
      ('wall_s', 'eval_s', 'median_ms_per_iter', 'best_iter', 'best_val_loss', 'test_loss', 'heldout_loss')}}))
