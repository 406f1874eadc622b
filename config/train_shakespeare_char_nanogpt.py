# nanoGPT's own shakespeare_char recipe, unchanged (5000 iterations), for the comparison with nanoGPT.
# It overfits after ~2000 iterations; the best checkpoint is kept separately from the last.

out_dir = 'out-shakespeare-char-nanogpt'
model_type = 'vanilla'
eval_interval = 250
log_interval = 10
eval_iters = 10
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
# lr_decay_iters is left at 0: the decay ends at max_iters, also when an override changes it
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
