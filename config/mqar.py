# Multi-query associative recall (MQAR) on Zoology's protocol (Arora et al. 2023, "Zoology", Figure 2), trained
# through the same GPT and train() as everything else (tasks.py: the generator and the task).
#
#   train('config/mqar.py')                                            # attention, L=512, kv=64, d_model 128
#   train('config/mqar.py', {'model_type': 'delta', 'n_embd': 64})     # DeltaNet at d_model 64
#   train('config/mqar.py', {'seq_len': 256, 'num_kv_pairs': 16, 'batch_size': 256, 'learning_rate': 1e-2})
#
# Zoology's names -> this repository's keys: d_model -> n_embd, n_layers -> n_layer, num_heads -> n_head,
# input_seq_len -> seq_len (the model's block_size follows it: block_size = 0), num_kv_pairs -> num_kv_pairs,
# vocab_size -> vocab (the model's vocab_size follows it), num_train_examples / num_test_examples ->
# n_train / n_test, max_epochs -> epochs, early_stopping_threshold -> early_stop_acc, embed_dropout ->
# embd_dropout, resid_dropout -> dropout, state mixer Identity -> mlp = False.
# The settings of Figure 2: (seq_len, num_kv_pairs) in (64, 4), (128, 8), (256, 16), (512, 64); d_model in
# {64, 128, 256}; learning_rate in {1e-4, 4.64e-4, 2.15e-3, 1e-2}; batch 512 (L <= 128), 256 (L = 256), 128 (L = 512).
out_dir = 'out-mqar'
task = 'mqar'

# data: V = 8192, keys [1, V/2), values [V/2, V); 100,000 training and 3,000 test examples from disjoint seeds
seq_len = 512
num_kv_pairs = 64
vocab = 8192
n_train = 100_000
n_test = 3_000
power_a = 0.01

# training: AdamW (weight decay 0.1, PyTorch's betas), cosine to ~0 over the run, no warm-up, no clipping; up to
# 64 epochs, evaluated on the test set every epoch, stopping once test accuracy exceeds 0.99
epochs = 64
max_iters = 0            # the length comes from epochs
early_stop_acc = 0.99
eval_interval = 0        # 0 -> once per epoch
log_interval = 50
batch_size = 128
learning_rate = 2.15e-3
weight_decay = 0.1
beta2 = 0.999
grad_clip = 0.0
warmup_iters = 0
min_lr = 1e-9            # ~0 (min_lr = 0 would mean learning_rate / 10)

# model: 2 layers, no MLP (Zoology's state mixer is the identity: each block adds ln_2(x) where the MLP's
# output would be), dropout 0.1 on the embeddings only, GPT-2 init, d_model 128
n_layer = 2
n_embd = 128
mlp = False
dropout = 0.0
embd_dropout = 0.1
block_size = 0           # 0 -> seq_len (attention's learned position table is L long)

# each mixer's layout (head_dim = 0: n_embd // n_head, so an n_embd override keeps it)
per_model = {
    'vanilla': dict(n_head=1, pos_emb='learned'),
    'delta': dict(n_head=2, head_dim=0, conv_size=4),
    'delta_product': dict(n_head=2, head_dim=0, num_householder=2),
    # the kernel's rules: 16 query heads per KV head, head_dim a power of two >= 16, blocks a power of two >= 16.
    # Blocks and window at L / 8 and L / 4 (the bake-off's proportions at T = 256; Zoology's own NSA uses a
    # window of 16 and 4 selected blocks of 8, below the kernel's minimum block). Set for L = 512: another
    # seq_len needs nsa_block_size = max(16, L // 8), nsa_window_size = L // 4 passed with it.
    'nsa': dict(n_head=16, n_kv_head=1, head_dim=32, nsa_block_size=64, nsa_block_counts=4, nsa_window_size=128),
}
