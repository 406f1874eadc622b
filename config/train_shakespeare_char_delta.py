# DeltaNet on shakespeare_char, the repository's setting (see train_shakespeare_char.py). Everything not set
# here is train_runner.DEFAULTS (nanoGPT's shakespeare_char: 6 layers, 384 wide, context 256, batch 64,
# dropout 0.2, beta2 0.99) or model_delta.GPTConfig (6 heads x 64, short convs of 4, MLP width solved
# so that total parameters match vanilla's).
out_dir = 'out-shakespeare-char-delta'
model_type = 'delta'
learning_rate = 1e-3
max_iters = 3000
