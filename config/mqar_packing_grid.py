# Does packing pay at MQAR's size? One run per mixer at the grid's largest setting (L 512, 64 pairs, d_model 128,
# batch 128), 3 epochs, early stopping off, so that every run trains the same number of steps. Train it twice and
# compare each run's median ms/iter (its summary.json), alone against shared:
#
#   python train_runner.py --stages=mqar --mqar_grid=config/mqar_packing_grid.py --grids_dir=<a>                   # one at a time
#   python train_runner.py --stages=mqar --mqar_grid=config/mqar_packing_grid.py --grids_dir=<b> --procs_per_gpu=4 # four at once
#
# Packing pays where 4 x (ms/iter alone) > (ms/iter shared), i.e. where the four runs together step faster
# than one after another. (For the 10.7M language models it did not: results/gpu-sharing/.)
base = 'config/mqar.py'

runs = [dict(name=f"{m}-d128-L512-kv64-pack", model_type=m, n_embd=128, seq_len=512, num_kv_pairs=64,
             batch_size=128, learning_rate=2.15e-3, epochs=3, early_stop_acc=0.0,
             **(dict(nsa_block_size=64, nsa_window_size=128) if m == 'nsa' else {}))
        for m in ['vanilla', 'delta', 'delta_product', 'nsa']]
