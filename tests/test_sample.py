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


def test_sample_gpt2_bpe_round_trips(prepared_bpe, gpt2_bpe, tmp_path, capsys, monkeypatch):
    """dataset=shakespeare has no meta.pkl: sample.py encodes the prompt and decodes the sample with tiktoken's
    GPT-2 encoding, as nanoGPT's sample.py does."""
    train_runner.train(None, {**model_lib.TINY, 'dataset': 'shakespeare', 'block_size': 32, 'out_dir': str(tmp_path),
                              'max_iters': 1, 'eval_interval': 1, 'eval_iters': 1, 'batch_size': 4, 'device': 'cpu',
                              'compile': False, 'dropout': 0.0})
    capsys.readouterr()
    seen = {}
    generate = model_lib.GPT.generate

    def spy(self, idx, *a, **k):
        y = generate(self, idx, *a, **k)
        seen['x'], seen['y'] = idx[0].tolist(), y[0].tolist()
        return y
    monkeypatch.setattr(model_lib.GPT, 'generate', spy)
    prompt = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun."
    (tmp_path / 'prompt.txt').write_text(prompt)
    sample.main([f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path / "prompt.txt"}', '--num_samples=1',
                 '--max_new_tokens=8', '--temperature=0', '--device=cpu', '--ckpt=last'])
    out = capsys.readouterr().out  # header lines (model, compile decision, timing), then the sample
    text = out[out.index('\nROMEO:') + 1:].rsplit('\n---------------', 1)[0]
    assert seen['x'] == gpt2_bpe.encode(prompt) and len(seen['y']) == len(seen['x']) + 8
    assert text.startswith(prompt) and len(text) > len(prompt)
    if max(seen['y']) < gpt2_bpe.n_vocab:
        assert text == gpt2_bpe.decode(seen['y'])
    # the padded vocabulary's ids (50257..50303) are no GPT-2 token: shown as U+FFFD, not a crash
    from runtime import codec
    encode, decode = codec('shakespeare', 50304)
    assert decode(encode(prompt) + [50300]) == prompt + '\ufffd'
