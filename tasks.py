"""
What train() trains on. One training loop serves every task (Zoology's design): a task hands out training
batches and evaluates a model; train_runner does everything else (optimizer, schedule, logging,
checkpoints, early stopping). The `task` key chooses:

    lm            next-token windows of a dataset (shakespeare_char): nanoGPT's setting, the default
    mqar          multi-query associative recall (Arora et al. 2023, "Zoology"), generated
    word_problem  running products in a finite group (Merrill et al. 2024, "The Illusion of State";
                  DeltaProduct's state-tracking runs): Z2 (parity), S3, A5, S5, generated

The examples-based tasks (mqar, word_problem) hold whole examples x, y of shape (N, L), with y = -100
where a position has no target (the model's loss ignores -100). They train over a fixed training set
in epochs (a fresh shuffle each epoch, drop_last) or for max_iters steps, and evaluate on test sets
drawn from other seeds: the loss over the targets and the accuracy (over an example's targets, averaged
over examples). A run stops early once the test accuracy exceeds early_stop_acc.

Each task's keys (TASK_KEYS) are training keys like any other: valid only for that task, type-checked,
recorded in config.json. check_config validates them (errors name the valid choices) and derives
max_iters (epochs x steps per epoch) and eval_interval (0 -> once per epoch) for the examples tasks.
"""

import functools
import itertools

import numpy as np
import torch
from torch.nn import functional as F

from runtime import ConfigError, Progress, check_block_size, load_dataset

IGNORE = -100  # the target of a position that has none (model.GPT.forward's cross_entropy ignores it)

# each task's keys: name=(default, meaning); `train_runner.py --task=X --help` and docs/configuration.md
# are made from this table
TABLE = {
    'lm': {},
    'mqar': dict(
        seq_len=(512, "L: tokens per example (the model's block_size follows it with block_size=0)"),
        num_kv_pairs=(64, "key-value pairs per example (and as many queries); 4 x num_kv_pairs <= seq_len"),
        vocab=(8192, "V: keys from [1, V/2), values from [V/2, V); the model's vocab_size follows it"),
        power_a=(0.01, "query slot i (1, 2, ... after the pairs) drawn with p(i) ~ a * i^(a - 1); > 0"),
        n_train=(100_000, "training examples"),
        n_test=(3_000, "test examples (another seed)"),
        data_seed=(0, "the examples' seed (the training seed `seed` shuffles them and inits the model)"),
        epochs=(64, "passes over the training examples; 0: train for max_iters steps instead"),
        early_stop_acc=(0.99, "stop once test accuracy exceeds this (0: never)"),
    ),
    'word_problem': dict(
        group=('S3', "the group: " + ', '.join(('Z2 (parity)', 'S3', 'A5', 'S5'))),
        train_len=(128, "T of the training sequences"),
        test_lens=([128, 256, 512], "test lengths (fresh samples at each; --test_lens=256,512); the accuracy at "
                                    "train_len stops early"),
        n_train=(100_000, "training sequences"),
        n_test=(1_000, "test sequences per length"),
        data_seed=(0, "the sequences' seed (the training seed `seed` shuffles them and inits the model)"),
        epochs=(100, "passes over the training sequences; 0: train for max_iters steps instead"),
        early_stop_acc=(0.0, "stop once test accuracy at train_len exceeds this (0: never; DeltaProduct's runs "
                             "train every epoch)"),
    ),
}
TASK_KEYS = {t: {k: d for k, (d, _) in keys.items()} for t, keys in TABLE.items()}
HELP = {k: h for keys in TABLE.values() for k, (_, h) in keys.items()}
# keys that take only these values (train_runner's CHOICES), and the lowest valid value of numeric keys
# (train_runner's MINIMUM; checked before check_config derives anything from them)
CHOICES = {'task': tuple(TABLE), 'group': ('Z2', 'S3', 'A5', 'S5')}
MINIMUM = dict(num_kv_pairs=1, n_train=1, n_test=1, data_seed=0, epochs=0, train_len=1, early_stop_acc=0.0)


# the training and model keys' defaults an examples task changes (tasks.check_config resolves them):
# block_size 0 (the longest sequence), max_iters 0 (the length comes from epochs), eval_interval 0 (every epoch)
EXAMPLES_DEFAULTS = dict(block_size=0, max_iters=0, eval_interval=0)


def defaults(task):
    """The task's defaults of training and model keys (applied after theirs, before a config file's)."""
    return {} if task == 'lm' else dict(EXAMPLES_DEFAULTS)


def task_keys(task):
    if task not in TASK_KEYS:
        raise ConfigError(f"unknown task {task!r}; valid choices: {', '.join(TASK_KEYS)}")
    return dict(TASK_KEYS[task])


def steps_per_epoch(cfg):
    """Optimizer steps per pass over the training examples (whole batches only)."""
    return cfg['n_train'] // (cfg['batch_size'] * cfg['gradient_accumulation_steps'])


def max_len(cfg):
    """The longest sequence the task feeds the model (what its block_size must hold)."""
    if cfg['task'] == 'mqar':
        return cfg['seq_len']
    if cfg['task'] == 'word_problem':
        return max([cfg['train_len']] + cfg['test_lens'])
    return cfg['block_size']


def check_config(cfg):
    """Validate the task's keys in a resolved config (in place): ConfigError naming the valid choices.
    Examples tasks: block_size 0 -> the longest sequence; max_iters from epochs; eval_interval 0 -> one epoch."""
    task = cfg['task']
    task_keys(task)
    if task != 'mqar' and cfg.get('loss_positions', 0):
        raise ConfigError(f"loss_positions must be 0 for {task}: it has a target at every position")
    if task == 'lm':  # block_size: train_runner's MINIMUM
        return cfg
    if task == 'mqar':
        L, kv, V = cfg['seq_len'], cfg['num_kv_pairs'], cfg['vocab']
        if L < 2 or L % 2:
            raise ConfigError(f"seq_len must be even (key-value pairs, then 2-token query slots), got {L}")
        if V <= L:
            raise ConfigError(f"vocab must be > seq_len (Zoology's protocol), got vocab {V}, seq_len {L}")
        if 4 * kv > L:
            raise ConfigError(f"num_kv_pairs must be in 1 .. seq_len/4 = {L // 4} (4 kv <= L: room for a query "
                              f"of every key), got {kv}")
        if not cfg['power_a'] > 0:
            raise ConfigError(f"power_a must be > 0, got {cfg['power_a']}")
        if cfg.get('loss_positions', 0) not in (0, kv):  # every example has exactly kv targets
            raise ConfigError(f"loss_positions is num_kv_pairs ({kv}) for mqar (0: set so), got {cfg['loss_positions']}")
        cfg['loss_positions'] = kv
    else:
        lens = cfg['test_lens']  # a list (train_runner's check_value makes the command line's tuple one)
        if not lens or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lens):
            raise ConfigError(f"test_lens must be positive ints (e.g. [128, 256, 512]), got {cfg['test_lens']!r}")
        cfg['test_lens'] = sorted(set(lens))
    if not 0 <= cfg['early_stop_acc'] <= 1:
        raise ConfigError(f"early_stop_acc must be in [0, 1] (0: no early stopping), got {cfg['early_stop_acc']}")
    need = max_len(cfg)
    if cfg['block_size'] == 0:
        cfg['block_size'] = need
    elif cfg['block_size'] < need:
        raise ConfigError(f"block_size {cfg['block_size']} is shorter than the task's longest sequence ({need}); "
                          f"use block_size=0 (= {need})")
    spe = steps_per_epoch(cfg)
    if spe < 1:
        raise ConfigError(f"n_train ({cfg['n_train']}) is less than one step's examples (batch_size x "
                          f"gradient_accumulation_steps = {cfg['batch_size'] * cfg['gradient_accumulation_steps']})")
    if cfg['epochs'] > 0:
        if cfg['max_iters'] not in (0, cfg['epochs'] * spe):
            raise ConfigError(f"give epochs or max_iters, not both: epochs={cfg['epochs']} is "
                              f"{cfg['epochs'] * spe} steps, max_iters={cfg['max_iters']} (set epochs=0 to train by steps)")
        cfg['max_iters'] = cfg['epochs'] * spe
    elif cfg['max_iters'] < 1:
        raise ConfigError("epochs=0 and max_iters=0: give the run's length in one of them")
    if cfg['eval_interval'] == 0:
        cfg['eval_interval'] = spe
    return cfg


def vocab_size(cfg):
    """The model's vocab_size for an examples task's config (None for lm: the dataset's, known once loaded)."""
    return {'mqar': lambda: cfg['vocab'], 'word_problem': lambda: len(group_table(cfg['group']))}.get(
        cfg['task'], lambda: None)()


def make_task(cfg, device, eval_bs):
    return {'lm': LMTask, 'mqar': MQARTask, 'word_problem': WordProblemTask}[cfg['task']](cfg, device, eval_bs)


# ----------------------------------------------------------------------------------------------
# lm: windows of a token stream (what train_runner did before tasks existed, draw for draw)

def get_batch(data, ix, block_size):
    """Windows starting at ix (B,) -> x, y (B, T). Indexing happens on data's device: no host copies."""
    offs = torch.arange(block_size + 1, device=data.device)
    win = data[ix.to(data.device, non_blocking=True)[:, None] + offs]  # (B, T+1)
    return win[:, :-1], win[:, 1:]


class LMTask:
    """Random windows of block_size tokens for training; a fixed evaluation set of eval_iters batches of
    eval_bs windows per split (the same for every run, model and seed). evaluate() measures the selection
    splits {'train', 'val'} (what picks checkpoints and hyperparameters); with a dataset that has a test split,
    REPORT_SPLITS are measured only where train() asks (once, on the chosen checkpoint): 'test', and 'heldout', the
    whole last 10% (val then test: nanoGPT's val set, for the comparison with nanoGPT only)."""
    examples = False
    SELECT_SPLITS = ('train', 'val')
    REPORT_SPLITS = ('test', 'heldout')

    def __init__(self, cfg, device, eval_bs):
        self.data, self.meta = load_dataset(cfg['dataset'], device)
        if 'test' in self.data:  # contiguous: a window may straddle val and test, as it does in nanoGPT's val.bin
            self.data['heldout'] = torch.cat([self.data['val'], self.data['test']])
        self.report_splits = tuple(s for s in self.REPORT_SPLITS if s in self.data)
        # no meta.pkl: GPT-2 BPE, its 50257 tokens padded to 50304, a multiple of 64, as nanoGPT pads
        self.vocab_size = self.meta['vocab_size'] if self.meta else 50304
        self.block_size = self.train_len = cfg['block_size']
        check_block_size(self.data, self.block_size, cfg['dataset'])
        g = torch.Generator().manual_seed(12345)  # same evaluation windows for every run, model and seed
        # a window starts at 0 .. len - block_size - 1 (it takes block_size + 1 tokens): randint's high is exclusive
        self.eval_ix = {s: [torch.randint(len(d) - self.block_size, (eval_bs,), generator=g)
                            for _ in range(cfg['eval_iters'])] for s, d in self.data.items()}
        self.early_stop_acc = 0.0

    def train_batch(self, batch_size, gen, index):
        """A batch of random windows drawn with gen (index, the batch's number in the run, is unused)."""
        d = self.data['train']
        return get_batch(d, torch.randint(len(d) - self.block_size, (batch_size,), generator=gen), self.block_size)

    @torch.no_grad()
    def evaluate(self, model, autocast, desc='', splits=SELECT_SPLITS):
        """{split: mean loss over its fixed windows} for `splits` (default: the selection splits)."""
        out = {}
        progress = Progress(sum(len(self.eval_ix[s]) for s in splits), desc, bar=True)  # minutes on CPU
        for split in splits:
            ixs = self.eval_ix[split]
            losses = torch.zeros(len(ixs))
            for i, ix in enumerate(ixs):
                X, Y = get_batch(self.data[split], ix, self.block_size)
                with autocast:
                    losses[i] = model(X, Y)[1].item()
                progress.update()
            out[split] = losses.mean().item()
        progress.close()
        return out


# ----------------------------------------------------------------------------------------------
# examples-based tasks

class ExamplesTask:
    """Whole examples (x, y), y = IGNORE where there is no target. Subclasses set self.train (x, y), the
    test sets self.tests {name: (x, y)} (the first is the one early stopping and 'val' read), vocab_size
    and train_len. Examples are stored as int16 (V <= 32767) on the device and widened per batch."""
    examples = True
    report_splits = ()  # the test sets are measured at every evaluation (accuracies), not only at a best

    def __init__(self, cfg, device, eval_bs):
        self.cfg, self.device, self.eval_bs = cfg, device, eval_bs
        self.steps_per_epoch = steps_per_epoch(cfg)
        # micro-batches per epoch (all ranks' together): whole steps only, so epochs and steps line up
        self.batches_per_epoch = self.steps_per_epoch * cfg['gradient_accumulation_steps']
        self.early_stop_acc = cfg['early_stop_acc']
        self._perm = (None, None)  # (epoch, its permutation of the training examples)

    def _to_device(self, x, y):
        dt = np.int16 if max(int(x.max()), int(y.max())) < 2 ** 15 else np.int32
        return torch.from_numpy(x.astype(dt)).to(self.device), torch.from_numpy(y.astype(dt)).to(self.device)

    def train_batch(self, batch_size, gen, index):
        """The index-th micro-batch of the run (counted over steps, micro-steps and ranks): batch index %
        batches_per_epoch of epoch index // batches_per_epoch, whose shuffle depends on (seed, epoch) only,
        so a resumed run continues exactly (gen, the LM task's stream, is unused)."""
        epoch, j = divmod(index, self.batches_per_epoch)
        if self._perm[0] != epoch:
            seed = int(np.random.SeedSequence([self.cfg['seed'], epoch]).generate_state(1)[0])
            self._perm = (epoch, torch.randperm(self.cfg['n_train'], generator=torch.Generator().manual_seed(seed))
                          .to(self.device))
        rows = self._perm[1][j * batch_size:(j + 1) * batch_size]
        x, y = self.train
        return x[rows].long(), y[rows].long()

    @torch.no_grad()
    def _score(self, model, autocast, x_all, y_all):
        """(mean loss over the targets, accuracy over each example's targets averaged over examples)."""
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        n_targets = torch.zeros((), device=self.device, dtype=torch.float64)
        acc_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(0, len(x_all), self.eval_bs):
            x, y = x_all[i:i + self.eval_bs].long(), y_all[i:i + self.eval_bs].long()
            with autocast:
                logits = model(x)[0]
            logits = logits.float()
            mask = y != IGNORE
            loss_sum += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE,
                                        reduction='sum').double()
            n_targets += mask.sum()
            correct = ((logits.argmax(-1) == y) & mask).sum(1)
            acc_sum += (correct / mask.sum(1).clamp_min(1)).double().sum()
        return (loss_sum / n_targets).item(), (acc_sum / len(x_all)).item()

    def evaluate(self, model, autocast, desc=''):
        """{'train': loss, 'val': test loss, 'train_acc', 'test_acc', ...}: the train figures over the first
        n_test training examples; 'val' / 'test_acc' on the first test set (early stopping reads it)."""
        n = min(self.cfg['n_test'], len(self.train[0]))
        out = {}
        out['train'], out['train_acc'] = self._score(model, autocast, self.train[0][:n], self.train[1][:n])
        for i, (name, (x, y)) in enumerate(self.tests.items()):
            loss, acc = self._score(model, autocast, x, y)
            if i == 0:
                out['val'], out['test_acc'] = loss, acc
            if len(self.tests) > 1:
                out[f'test_loss_{name}'], out[f'test_acc_{name}'] = loss, acc
        return out


# ----------------------------------------------------------------------------------------------
# MQAR

def _has_duplicates(rows):
    s = np.sort(rows, axis=1)
    return (s[:, 1:] == s[:, :-1]).any(axis=1)


def distinct_rows(rng, n, k, lo, hi):
    """(n, k) ints from [lo, hi), each row k distinct values uniformly (an ordered sample without
    replacement). When k^2 <= 2 (hi - lo) a row of k uniform draws is all distinct with probability
    >= ~e^-1/2, so rows with a repeat are drawn again (exact: a row is accepted as a whole); otherwise
    the first k of a random permutation (argsort of uniforms), in chunks of rows."""
    m = hi - lo
    if k > m:
        raise ValueError(f"can't draw {k} distinct values from {m}")
    if k * k <= 2 * m:
        out = rng.integers(lo, hi, (n, k))
        bad = np.flatnonzero(_has_duplicates(out))
        while len(bad):
            out[bad] = rng.integers(lo, hi, (len(bad), k))
            bad = bad[_has_duplicates(out[bad])]
        return out
    chunk = max(1, (1 << 24) // m)
    return np.concatenate([lo + np.argsort(rng.random((min(chunk, n - i), m)), axis=1)[:, :k]
                           for i in range(0, n, chunk)])


def mqar_examples(n, seq_len, num_kv_pairs, vocab, seed, power_a=0.01):
    """n MQAR examples on Zoology's protocol (Figure 2: random_non_queries=False), deterministic in seed.

    An example of L = seq_len tokens with kv = num_kv_pairs:
      - kv distinct keys from [1, V/2) and kv distinct values from [V/2, V) (V = vocab);
      - positions 0 .. 2kv-1 hold k1 v1 k2 v2 ... kv-th pair;
      - the other L - 2kv positions are (L - 2kv)/2 query slots of two tokens; slot i = 1, 2, ...
        starts at position 2kv + 2(i - 1). kv slots are drawn without replacement, one after another with
        p(i) ~ a i^(a-1) (a = power_a; a = 0.01 favours the slots right after the pairs), and the j-th key
        is placed in the j-th slot drawn. Every other position is 0.
      - y: at each query key's position, its value (the next token the model should produce: the one-token
        shift of a sequence whose query key is followed by its value); IGNORE everywhere else.
    The successive draws are made at once by Efraimidis-Spirakis sampling (the kv largest u^(1/w) in
    decreasing order, here the kv smallest E / w with E ~ Exp(1)), which has the same distribution.
    Returns x, y: int64 arrays (n, L)."""
    L, kv, V = seq_len, num_kv_pairs, vocab
    assert L % 2 == 0, f"seq_len must be even, got {L}"
    assert V > L, f"vocab ({V}) must be > seq_len ({L})"
    assert 4 * kv <= L and kv >= 1, f"need 1 <= num_kv_pairs and 4 num_kv_pairs <= seq_len, got {kv}, {L}"
    rng = np.random.default_rng(seed)
    keys = distinct_rows(rng, n, kv, 1, V // 2)              # (n, kv)
    values = distinct_rows(rng, n, kv, V // 2, V)            # (n, kv)
    n_slots = (L - 2 * kv) // 2
    w = power_a * np.arange(1, n_slots + 1, dtype=np.float64) ** (power_a - 1)  # p(slot i), unnormalised
    slots = np.argsort(rng.standard_exponential((n, n_slots)) / w, axis=1, kind='stable')[:, :kv]  # 0-based, drawn order
    x = np.zeros((n, L), dtype=np.int64)
    y = np.full((n, L), IGNORE, dtype=np.int64)
    x[:, 0:2 * kv:2], x[:, 1:2 * kv:2] = keys, values
    qpos = 2 * kv + 2 * slots                                # (n, kv) the query keys' positions
    np.put_along_axis(x, qpos, keys, axis=1)
    np.put_along_axis(y, qpos, values, axis=1)
    return x, y


@functools.lru_cache(maxsize=8)
def _mqar_cached(n, seq_len, num_kv_pairs, vocab, seed, power_a):
    x, y = mqar_examples(n, seq_len, num_kv_pairs, vocab, seed, power_a)
    x.flags.writeable = y.flags.writeable = False  # shared between the runs of one process
    return x, y


def mqar_seeds(data_seed):
    """The training and test examples' seeds: disjoint entropy ([data_seed, 0] vs [data_seed, 1])."""
    return (data_seed, 0), (data_seed, 1)


class MQARTask(ExamplesTask):
    def __init__(self, cfg, device, eval_bs):
        super().__init__(cfg, device, eval_bs)
        args = (cfg['seq_len'], cfg['num_kv_pairs'], cfg['vocab'])
        s_train, s_test = mqar_seeds(cfg['data_seed'])
        self.train = self._to_device(*_mqar_cached(cfg['n_train'], *args, s_train, cfg['power_a']))
        self.tests = {'test': self._to_device(*_mqar_cached(cfg['n_test'], *args, s_test, cfg['power_a']))}
        self.vocab_size = vocab_size(cfg)
        self.train_len = cfg['seq_len']


# ----------------------------------------------------------------------------------------------
# word problems

def compose(p, q):
    """The permutation p . q: first q, then p: (p . q)(i) = p(q(i)). Permutations are tuples, p[i] = p(i)."""
    return tuple(p[i] for i in q)


def permutation_group(perms):
    """(elements, table) for a group given as a list of permutations (closed under compose): element a
    is perms[a], and table[a, b] = the index of perms[a] . perms[b]."""
    index = {p: i for i, p in enumerate(perms)}
    table = np.array([[index[compose(a, b)] for b in perms] for a in perms], dtype=np.int64)
    return list(perms), table


def _even(p):
    inversions = sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
    return inversions % 2 == 0


# element 0 is the identity in every group (permutations in lexicographic order start with it)
GROUPS = {
    'Z2': lambda: permutation_group(list(itertools.permutations(range(2)))),   # = S2: a . b = a XOR b
    'S3': lambda: permutation_group(list(itertools.permutations(range(3)))),
    'A5': lambda: permutation_group([p for p in itertools.permutations(range(5)) if _even(p)]),
    'S5': lambda: permutation_group(list(itertools.permutations(range(5)))),
}


def group_table(name):
    if name not in GROUPS:
        raise ValueError(f"unknown group {name!r}; valid choices: {', '.join(GROUPS)}")
    return GROUPS[name]()[1]


def running_products(x, table):
    """x (n, T) element indices -> y (n, T) with y[:, t] = x[:, 0] . x[:, 1] . ... . x[:, t] (left to right:
    y_t = y_{t-1} . x_t, so as a permutation the latest element acts first)."""
    y = np.empty_like(x)
    y[:, 0] = x[:, 0]
    for t in range(1, x.shape[1]):
        y[:, t] = table[y[:, t - 1], x[:, t]]
    return y


def word_problems(n, T, group, seed):
    """n sequences of T elements drawn uniformly from the group, and their running products (every position
    has a target). Returns x, y int64 (n, T). The other order (y_t = x_t . y_{t-1}) is the same task up to
    relabelling every element by its inverse, so the choice does not change what a model can learn."""
    table = group_table(group)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, len(table), (n, T))
    return x, running_products(x, table)


class WordProblemTask(ExamplesTask):
    def __init__(self, cfg, device, eval_bs):
        super().__init__(cfg, device, eval_bs)
        G, s = cfg['group'], cfg['data_seed']
        self.train = self._to_device(*word_problems(cfg['n_train'], cfg['train_len'], G, (s, 0)))
        # the training length first: 'val' and early stopping read it
        lens = [cfg['train_len']] + [n for n in cfg['test_lens'] if n != cfg['train_len']]
        self.tests = {str(n): self._to_device(*word_problems(cfg['n_test'], n, G, (s, 1, n))) for n in lens}
        self.vocab_size = vocab_size(cfg)
        self.train_len = cfg['train_len']
