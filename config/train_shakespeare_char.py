# vanilla GPT (causal softmax attention) on shakespeare_char: the repository's setting,
# nanoGPT's shakespeare_char shape (6 layers, 6 heads, 384 wide, context 256, batch 64) at 3000 iterations.
# The other configs in this folder change only the model type and its mixer's settings.

out_dir = 'out-shakespeare-char'
model_type = 'vanilla'

eval_interval = 250
log_interval = 10
eval_iters = 10          # x eval_batch_size (256) windows: a fixed evaluation set, the same for every model

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256         # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3     # the best of [5e-4, 1e-3, 3e-3] is chosen per model by the sweep
max_iters = 3000
# lr_decay_iters is left at 0: the decay ends at max_iters, also when an override changes it
min_lr = 0.0             # 0 -> learning_rate / 10 (nanoGPT's 1e-4 at lr 1e-3), so LR overrides scale it too
beta2 = 0.99             # a bit bigger because the number of tokens per iter is small
warmup_iters = 100
