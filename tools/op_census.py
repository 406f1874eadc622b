"""How many tensor ops one decoding step runs per token (the uncompiled static step that a CUDA graph
replays: on the GPU each is about one kernel), counted on CPU through the dispatcher, for the four
full-size models at context 1024 under bf16 autocast with the autocast cache off and the Linear weights
cast beforehand (as GraphedDecodeStep captures it since commit 52d299a). View and metadata ops launch
no kernel and are not counted. Produces results/decode-speedups/fused-projections/op_census.txt (the
step of commit e72a655); results/decode-modes/op_census.txt holds the counts of the step that still cast
every weight itself on every token (counted by this script at commit 9940d1f).

    python tools/op_census.py > results/decode-speedups/fused-projections/op_census.txt
"""
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import bench  # noqa: E402
import model as model_lib  # noqa: E402

NO_KERNEL = {'view', '_unsafe_view', 'as_strided', 'slice', 'select', 'unsqueeze', 'squeeze', 'transpose', 't',
             'expand', 'permute', 'reshape', 'alias', 'detach', 'split', 'split_with_sizes', 'unbind', 'diagonal',
             'narrow', 'unflatten', '_reshape_alias', 'promote_types'}


class Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


if __name__ == '__main__':
    L = 1024
    for mt in model_lib.MODEL_TYPES:
        kw = bench.model_kwargs(mt, model_lib.get_model_module(mt), False, None)
        m = model_lib.build_model(mt, **{**kw, 'block_size': L + 32}).eval()
        st = m.init_state(1, L + 32, dtype=torch.bfloat16)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False):
            m(torch.zeros(1, L, dtype=torch.long), state=st)  # prefill
            tok, pos = torch.zeros(1, 1, dtype=torch.long), torch.tensor(st.pos)
            with model_lib.weights_swapped(m, model_lib.cast_linear_weights(m, torch.bfloat16)), Census() as c:
                m.static_step(tok, st.layers, pos)
        print(f"{mt}: {sum(c.ops.values())} ops per token, of which {c.ops['_to_copy']} dtype casts; "
              f"most frequent: {', '.join(f'{k} {v}' for k, v in c.ops.most_common(8))}")
