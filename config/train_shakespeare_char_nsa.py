# NSA (Native Sparse Attention) on shakespeare_char, the repository's setting (see train_shakespeare_char.py).
# 16 query heads share 1 KV head (fla's kernel needs a power-of-two group >= 16), head_dim 32, RoPE.
# At T=256: compression sees every complete 32-token block before the query, selection attends to 4 blocks
# (128 of 256 tokens, the first/previous/current blocks forced), the window to the last 64 tokens.
out_dir = 'out-shakespeare-char-nsa'
model_type = 'nsa'
n_head = 16
n_kv_head = 1
head_dim = 32
nsa_block_size = 32
nsa_block_counts = 4
nsa_window_size = 64
learning_rate = 1e-3
max_iters = 3000
