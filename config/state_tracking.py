# State tracking: the "Illusion of State" word problems as DeltaProduct's code runs them (Siems et al. 2025):
# sequences of T elements drawn uniformly from a finite group, the target at every position the running
# product g1 . g2 . ... . gt (tasks.py: the tables written from the permutations, the composition order),
# loss and accuracy over every position. Train at T = 128, test on fresh samples at 128, 256 and 512.
#
#   train('config/state_tracking.py')                                                  # vanilla (RoPE), S3
#   train('config/state_tracking.py', {'model_type': 'delta', 'allow_neg_eigval': True, 'group': 'Z2'})
#   train('config/state_tracking.py', {'model_type': 'delta_product', 'num_householder': 2,
#                                      'allow_neg_eigval': True})
#
# DeltaProduct's S3 recipe: --k=128 --k_test=512 --n_layers=1 --epochs=100 --batch_size=2048 --lr=1e-3
# --use_scheduler=True, 100,000 training samples. Its names -> these keys: k -> train_len, k_test -> test_lens,
# n_layers -> n_layer, epochs -> epochs, batch_size -> batch_size, lr -> learning_rate.
out_dir = 'out-state-tracking'
task = 'word_problem'

group = 'S3'             # Z2 (parity), S3, A5, S5
train_len = 128
test_lens = [128, 256, 512]
n_train = 100_000
n_test = 1_000           # per test length
epochs = 100             # 48 steps each at batch 2048
max_iters = 0            # the length comes from epochs
early_stop_acc = 0.0     # every epoch, as DeltaProduct's runs
eval_interval = 480      # every 10 epochs and at the end (the reported accuracy is the last evaluation); each
                         # evaluation runs 3 x 1,000 test sequences up to 512 long: once per epoch it took a third
                         # of a run's time on the H200
log_interval = 10

# batch 2048 as DeltaProduct's recipe: 262,144 tokens a step at T = 128, 1-layer d_model 128 models; the
# evaluation at T = 512 runs in batches of the same size (eval_batch_size = 0 -> batch_size). Not yet measured
# on the GPU: if it does not fit, lower eval_batch_size first (it changes no training number).
batch_size = 2048
# AdamW at 1e-3 with a schedule: 100 warm-up steps (2% of the run), then cosine to learning_rate / 10
# (the repository's schedule; DeltaProduct's scheduler is not specified further in its recipe)
learning_rate = 1e-3
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.999

# model: 1 layer, d_model 128, heads of 32 (DeltaProduct's defaults); an MLP of 4 x d_model for every mixer
# (d_ff = 0: no parameter matching on this task), no dropout
n_layer = 1
n_embd = 128
d_ff = 0
dropout = 0.0
block_size = 0           # 0 -> the longest test length (512)

per_model = {
    # learned positions can't reach the test lengths (512 > 128 trained): RoPE
    'vanilla': dict(n_head=4, pos_emb='rope'),
    'delta': dict(n_head=4, head_dim=32),
    'delta_product': dict(n_head=4, head_dim=32),
    # the kernel's layout (16 query heads per KV head, head_dim >= 16); blocks and window at T / 8 and T / 4
    # of the training length, like the bake-off's
    'nsa': dict(n_head=16, n_kv_head=1, head_dim=32, nsa_block_size=16, nsa_block_counts=4, nsa_window_size=32),
}
