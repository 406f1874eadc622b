"""sample.py decodes from a checkpoint of any model_type, with the cache, and rejects bad options."""
import pytest

import model as model_lib
import sample
import train_runner


@pytest.mark.parametrize('model_type', list(model_lib.MODEL_TYPES))
def test_sample_every_model_type(prepared, tmp_path, capsys, model_type):
    tiny = model_lib.get_model_module(model_type).TINY
    train_runner.train(None, {**tiny, 'model_type': model_type, 'out_dir': str(tmp_path), 'max_iters': 2,
                              'eval_interval': 2, 'eval_iters': 1, 'batch_size': 4, 'device': 'cpu',
                              'compile': False, 'dropout': 0.0})
    capsys.readouterr()
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('ROMEO:\n')
    for cache in ('True', 'False'):
        sample.main([f'--out_dir={tmp_path}', f'--start=FILE:{prompt}', '--num_samples=1', '--max_new_tokens=20',
                     '--temperature=0', '--device=cpu', f'--use_cache={cache}'])
    out = capsys.readouterr().out
    texts = [block.split('ROMEO:', 1)[1] for block in out.split('---------------') if 'ROMEO:' in block]
    assert len(texts) == 2 and len(texts[0]) >= 21 and texts[0] == texts[1], texts  # greedy: cached == uncached
    assert f"{model_type} from" in out
    # how each sample ran and its speed after the prefill; the compile decision (none on CPU) said once
    assert out.count(' ms/token]') == 2 and out.count('tokens/s') == 2 and '[eager (no CUDA' in out
    assert 'torch.compile of the decoding step: off (no CUDA graph to compile' in out


def test_sample_rejects_unknown_option():
    with pytest.raises(ValueError, match='valid keys'):
        sample.parse_args(['--max_tokens=5'])
