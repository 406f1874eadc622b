"""The compiled decoding step (model.compiled_static_step(): one torch.compile(GPT.static_step,
fullgraph=True) for the process) through inductor on CPU, for the four tiny models: five steps each,
outputs equal to the uncompiled step's. A check that the form generate(compile=True) captures compiles
whole with the real compiler, where a C compiler is installed; on CUDA the same function is captured
in a CUDA graph (model.GraphedDecodeStep). Produces results/decode-modes/compiled_step_cpu.txt.

    python tools/compiled_step_cpu.py > results/decode-modes/compiled_step_cpu.txt
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as model_lib  # noqa: E402

if __name__ == '__main__':
    print(f"torch {torch.__version__}")
    for mt in model_lib.MODEL_TYPES:
        torch.manual_seed(0)
        m = model_lib.build_model(mt, **model_lib.get_model_module(mt).TINY).eval()
        a, b = m.init_state(1, 40), m.init_state(1, 40)
        prompt = torch.randint(0, 65, (1, 9))
        fn = model_lib.compiled_static_step()
        t0 = time.perf_counter()
        with torch.no_grad(), model_lib._recompile_limit(64):
            m(prompt, state=a)
            m(prompt, state=b)
            tok = prompt[:, -1:].clone()
            worst = 0.0
            for _ in range(5):
                want = m.static_step(tok, a.layers, torch.tensor(a.pos))
                got = fn(m, tok, b.layers, torch.tensor(b.pos))
                a.pos += 1
                b.pos += 1
                worst = max(worst, (got - want).abs().max().item())
                tok = want[:, -1].argmax(-1, keepdim=True)
        status = 'ok' if worst < 1e-4 else 'MISMATCH'
        print(f"{mt}: {status}, largest |compiled - eager| logit {worst:.2e} over 5 steps, "
              f"{time.perf_counter() - t0:.1f} s with compilation")
