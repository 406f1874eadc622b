# The bake-off's choices, read by the sweep (python train_runner.py): each model's tuned (learning rate,
# dropout) and the controls. Not a training config: train_runner.py config/bakeoff.py is not a run.
#
# tuned: (learning_rate, dropout) per model and preset, what the default sweep trains with 3 seeds: the choices
# of the tuning (`python train_runner.py --preset=full --tune`: the grid lr {5e-4, 1e-3, 3e-3} x dropout
# {0.1, 0.2, 0.3} at one seed, the lowest best val loss, the grid extended where the choice is on an edge;
# results/full/runs and the tuning table of results/full/REPORT.md). Three models' choices stop at a bound
# of the extension (lr in [1e-4, 3e-2], dropout <= 0.5): DeltaNet's lr (the next step, 8.1e-2, is past it) and
# dropout, Gated DeltaProduct's lr (the next step, 6.25e-5, is below it), NSA's dropout. `--tune` uses the
# tuning's choices whatever stands here. The CPU preset is not tuned: nanoGPT's shakespeare_char learning rate
# with its CPU dropout of 0, the same for every model.
tuned = {
    'full': {'vanilla': (3e-3, 0.3), 'delta': (2.7e-2, 0.5), 'delta_product': (1.25e-4, 0.4), 'nsa': (3e-3, 0.5)},
    'cpu': {'vanilla': (1e-3, 0.0), 'delta': (1e-3, 0.0), 'delta_product': (1e-3, 0.0), 'nsa': (1e-3, 0.0)},
}

# controls (--controls): variants of a model, '<model_type>+key=value+...', each trained at its parent's chosen
# (learning rate, dropout) with the same seeds and reported as a model of its own, under exactly this name.
controls = [
    'vanilla+attn_dropout=0',  # equal regularisation: only vanilla drops attention probabilities by default
    # vanilla in NSA's layout (model_nsa.GPTConfig's defaults: 16 query heads of 32 on 1 KV head, RoPE, no
    # learned positions; d_ff solved to match parameters): the dense twin that isolates NSA's sparsity
    'vanilla+n_head=16+n_kv_head=1+head_dim=32+pos_emb=rope+d_ff=-1',
    'delta+allow_neg_eigval=True',  # beta in (0, 2): transitions with eigenvalue down to -1
    'delta_product+allow_neg_eigval=True',  # fla's layer default and the paper's setting
    'delta_product+d_ff=1536',  # vanilla's MLP width: NOT parameter-matched (+2.64M); is the deficit the MLP's?
]

# contrasts: what each control isolates, and the alternatives against each other, (model, against, what
# differs): the report gives model's mean test loss minus against's with Welch's 95% interval (contrasts.csv),
# read as the differences from vanilla are. NSA is set against its dense twin, so its difference is the
# sparsity's alone.
contrasts = [
    ('vanilla+attn_dropout=0', 'vanilla', 'attention dropout off'),
    ('nsa', 'vanilla+n_head=16+n_kv_head=1+head_dim=32+pos_emb=rope+d_ff=-1', "sparse attention in the same layout"),
    ('delta+allow_neg_eigval=True', 'delta', 'beta in (0, 2)'),
    ('delta_product+allow_neg_eigval=True', 'delta_product', 'negative eigenvalues'),
    ('delta_product+d_ff=1536', 'delta_product', "vanilla's MLP width, +2.64M parameters"),
    ('delta', 'delta_product', 'the mixer'),
    ('delta', 'nsa', 'the mixer'),
    ('delta_product', 'nsa', 'the mixer'),
]
