# Gated DeltaProduct on shakespeare_char, the repository's setting (see train_shakespeare_char.py).
# Mixer defaults (model_delta_product.GPTConfig): 6 heads x 64, n_h = 2 Householder steps per token,
# beta in (0, 1); MLP width solved so that total parameters match vanilla's.
# On Hopper GPUs with Triton < 3.7.1, fla's gated backward needs tilelang (see README).
out_dir = 'out-shakespeare-char-delta-product'
model_type = 'delta_product'
num_householder = 2
allow_neg_eigval = False
learning_rate = 1e-3
max_iters = 3000
