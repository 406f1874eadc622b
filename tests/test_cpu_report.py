"""The report of a machine without CUDA: what needs CUDA says so, in the tables and the plots (no empty
panels), the bake-off's decode column is measured (context 1024 is in the CPU sizes), and throughput states
its spread over enough iterations; each benchmark's lines show its progress and ETA."""
import os
import struct

import pytest
import torch

import bench
from test_bench import read, write_fake_runs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU rendering')


def png_width(path):
    with open(path, 'rb') as f:
        return struct.unpack('>I', f.read(24)[16:20])[0]


@pytest.fixture(scope='module')
def cpu_results(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp('cpu'))
    write_fake_runs(os.path.join(out, 'runs', 'test'))
    bench.memory(out, tiny=True, models='vanilla,delta', contexts=[16, 32])
    bench.latency(out, tiny=True, models='vanilla,delta', n_decode=2, trials=1)  # the CPU sizes' contexts
    bench.throughput(out, tiny=True, models='vanilla,delta', shapes=[(2, 16)])  # the CPU sizes' iterations
    bench.bakeoff(out)
    bench.report(out)
    torch.set_num_threads(n)
    return out


def test_what_needs_cuda_says_so_in_the_tables(cpu_results):
    out = cpu_results
    table = {r['model']: r for r in read(os.path.join(out, 'bakeoff.csv'))}
    for mt in ('vanilla', 'delta'):
        assert table[mt]['oom_context_b1'] == table[mt]['oom_context_b4'] == 'needs CUDA'
        assert float(table[mt]['decode_ms_per_token_1024']) > 0 and table[mt]['decode_mode'] == 'eager'
    md = open(os.path.join(out, 'REPORT.md')).read()
    memory = md[md.index('## Memory'):md.index('## Generation latency')]
    assert 'needs CUDA' in memory and 'n/m' not in memory
    through = md[md.index('## Training throughput'):]
    rows = [ln for ln in through.splitlines() if ln.startswith('| vanilla') or ln.startswith('| delta')]
    assert rows and all('| needs CUDA |' in ln for ln in rows)  # the MFU column


def test_cpu_plots_have_no_empty_panels(cpu_results):
    # one panel each (7 in at 110 dpi), not two with an empty one (12 in): the text says what needs CUDA
    assert png_width(os.path.join(cpu_results, 'memory.png')) == 770
    assert png_width(os.path.join(cpu_results, 'throughput.png')) == 770


def test_cpu_throughput_states_its_spread(cpu_results):
    rows = read(os.path.join(cpu_results, 'throughput.csv'))
    for r in rows:
        assert int(r['iters']) >= 10 and float(r['min_ms']) <= float(r['ms_per_iter']) <= float(r['max_ms'])
    md = open(os.path.join(cpu_results, 'REPORT.md')).read()
    assert f"({float(rows[0]['min_ms']):.2f}-{float(rows[0]['max_ms']):.2f}, n={rows[0]['iters']})" in md


def test_each_benchmark_shows_its_progress(tmp_path, capsys):
    bench.throughput(str(tmp_path), tiny=True, models='vanilla', shapes=[(2, 16), (1, 32)], iters=2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('[throughput] vanilla B=')]
    assert '| 1/2, ' in lines[0] and 'elapsed, eta ' in lines[0] and '| 2/2, ' in lines[1]
