"""experiments/bench.py end to end on a tiny model: the tables' shape and the JSON's figures, never the timings; and
its mistakes, each one `error:` line before anything is measured.

    python -m pytest tests/test_bench.py -q
"""
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ENV, ROOT, assert_one_error, checksums

TINY = ['--model=', '--n_layer=2', '--n_head=2', '--n_embd=32', '--vocab_size=128', '--block_size=32',
        '--batch_size=2', '--warmup=1', '--repeats=2', '--prompt_len=4', '--new_tokens=8',
        '--new_tokens_uncached=4', '--device=cpu', '--peak_seconds=0.1',
        '--compare_compile=False']  # inductor takes about a minute per method on a CPU
METHODS = {'vanilla': 'vanilla', 'ponderlm2-k1': 'PonderLM-2 K=1', 'ponderlm2-k2': 'PonderLM-2 K=2',
           'ponderlm1-n3': 'PonderLM N=3'}


def bench(*args):
    # ENV: one thread, which the children inherit (on shared cores about half the time of torch's default)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'bench.py'), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def without_echo(text):
    """The lines of text without configurator.py's echo of the keys that were set (`config: key = value`)."""
    return [line for line in text.strip().splitlines() if not line.startswith('config: ')]


def table_rows(stdout, title):
    """The markdown table under the `## title` heading, as lists of cells (header first)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('## ' + title))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith('|'):
            rows.append([cell.strip() for cell in line.strip('|').split('|')])
        elif rows:
            break
    assert rows[1] == ['---'] * len(rows[0])
    return [rows[0]] + rows[2:]


def figures(node, path=''):
    """Every number (and flag: a bool) in the JSON outside the echo of the config, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from figures(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from figures(value, f"{path}/{i}")
    elif not isinstance(node, str):
        yield path, node


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    proc = bench(*TINY, f'--methods={",".join(METHODS)}', f'--json={out}', '--grad_passes=1',
                 '--thought_dropout=0.3')
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        return proc.stdout, json.load(f)


def test_tables_have_a_row_per_method_and_the_columns(run):
    stdout, data = run
    assert data['config']['shape'] == {'n_layer': 2, 'n_head': 2, 'n_embd': 32}  # the model measured
    body = stdout[stdout.index('machine: '):]  # configurator's `config:` echo may come first
    machine = body.splitlines()[0]
    assert body.startswith('machine: ') and 'torch ' in machine
    peak = re.search(r' \| matmul peak ([\d,.]+) GFLOP/s$', machine)
    assert peak and float(peak[1].replace(',', '')) > 0, machine
    train = table_rows(body, 'training')
    assert train[0] == ['method', 'step ms', 'tokens/s', 'GFLOP/step', 'GFLOP/s', 'of matmul peak', 'MFU',
                        'peak mem MiB', 'time vs vanilla', 'FLOPs vs vanilla', 'overhead']
    assert [row[0] for row in train[1:]] == list(METHODS.values())
    for name, row in zip(METHODS, train[1:]):
        assert len(row) == len(train[0]), row
        # on a CPU both are against the measured matmul peak: percentages (a model this tiny may round to 0%)
        assert re.fullmatch(r'\d+%', row[5]) and re.fullmatch(r'\d+\.\d%', row[6]), row
        assert row[6] == f"{100 * data['methods'][name]['train']['mfu']:.1f}%", row
    assert train[1][8] == train[1][9] == '1.00x'  # vanilla against itself
    decode = table_rows(body, 'decoding')
    assert decode[0] == ['method', 'KV cache tokens/s (8 new)', 'vs vanilla', 'no cache tokens/s (4 new)',
                         'vs vanilla']
    assert [row[0] for row in decode[1:]] == list(METHODS.values())
    hf = [line for line in body.splitlines() if line.startswith('Hugging Face generate (')]
    assert len(hf) == 1 and 'the same tokens: yes' in hf[0], hf
    assert '## profile of one training step' not in body  # profile=False by default
    assert '## training on CUDA' not in body
    variants = table_rows(body, 'training variants')
    assert variants[0] == ['method', 'eager tokens/s', 'checkpointed tokens/s', 'time vs eager', 'peak mem vs eager']
    assert [row[0] for row in variants[1:]] == list(METHODS.values())
    memory = table_rows(body, 'memory')
    assert memory[0] == ['method', 'plan MiB', 'measured MiB', 'measured / plan', 'plan, checkpointing MiB',
                         'measured, checkpointing MiB', 'measured / plan']
    assert [row[0] for row in memory[1:]] == list(METHODS.values())
    # truncated backpropagation: each PonderLM-2 method at G = 0 and 1, and the memory plans of two Pythias
    truncated = table_rows(body, 'truncated backpropagation')
    assert [row[:2] for row in truncated[1:]] == [['PonderLM-2 K=1', 'all (0)'], ['PonderLM-2 K=1', '1'],
                                                  ['PonderLM-2 K=2', 'all (0)'], ['PonderLM-2 K=2', '1']]
    for full, one in (truncated[1:3], truncated[3:5]):
        assert float(one[4]) < float(full[4]) and full[3] == '1.00x'  # GFLOP/step: the backward of one pass less
    plans = table_rows(body, 'memory plans with truncated backpropagation')
    assert [row[:3] for row in plans[1:]] == [[m, b, g] for m, b in (('pythia-70m', '8 x 2048'),
                                                                     ('pythia-1.4b', '1 x 2048'))
                                              for g in ('all (0)', '1', '2')]
    assert all(float(row[5].rstrip('x')) < 1 for row in plans[1:] if row[2] != 'all (0)')
    dropout = table_rows(body, 'thought dropout 0.3')  # each PonderLM-2 method with the index map
    assert [row[0] for row in dropout[1:]] == ['PonderLM-2 K=1', 'PonderLM-2 K=2']
    assert all(row[3].endswith('x') and float(row[3].rstrip('x')) > 0 for row in dropout[1:])


def test_json_has_every_figure_positive_and_finite(run):
    _, data = run
    machine = data['machine']
    assert machine['device'] == 'cpu'
    # a CPU has no datasheet peak: MFU is against the measured matmul peak too
    assert machine['matmul_peak_flops'] > 0 and machine['mfu_peak_flops'] == machine['matmul_peak_flops']
    assert list(data['methods']) == list(METHODS)
    for name, entry in data['methods'].items():
        assert entry['label'] == METHODS[name]
        assert set(entry) == {'label', 'train', 'decode', 'checkpoint', 'memory'} | ({'hf'} if name == 'vanilla'
                                                                                     else set()) \
            | ({'grad_passes', 'td'} if name.startswith('ponderlm2') else set())
        assert set(entry['memory']) == {'plain', 'checkpointing'}
        assert entry['memory']['plain']['plan_mib'] > entry['memory']['checkpointing']['plan_mib']
        train = entry['train']
        assert len(train['step_s']['samples']) == 2
        assert train['flops_per_step'] == train['flops_per_token'] * 2 * 32  # batch_size x block_size
        assert train['flops_per_s'] == pytest.approx(train['flops_per_step'] / train['step_s']['median'])
        # the share is against the peak measured in the method's own process after its steps, not the cached one
        assert train['matmul_peak_now'] > 0
        assert train['matmul_peak_share'] == pytest.approx(train['flops_per_s'] / train['matmul_peak_now'])
        # the child's MFU is against the cached peak (the file the parent wrote): as train.py's log line
        assert train['mfu'] == pytest.approx(train['flops_per_s'] / machine['matmul_peak_flops']), name
        assert entry['decode']['cached']['new_tokens'] == 8 and entry['decode']['uncached']['new_tokens'] == 4
    hf = data['methods']['vanilla']['hf']
    assert set(hf) == {'ours_tokens_per_s', 'hf_tokens_per_s', 'same_tokens', 'speedup'}
    assert len(hf['ours_tokens_per_s']['samples']) == len(hf['hf_tokens_per_s']['samples']) == 2
    assert hf['speedup'] == pytest.approx(hf['ours_tokens_per_s']['median'] / hf['hf_tokens_per_s']['median'])
    numbers = list(figures(data['methods']))
    assert len(numbers) > 100
    assert [path for path, _ in numbers if path.endswith('/same_tokens')] == ['/vanilla/hf/same_tokens']
    for path, value in numbers:
        if path.endswith('/same_tokens'):
            assert value is True, path  # greedy decoding of the same weights: Hugging Face's tokens are ours
        elif path.endswith(('/measured_mib', '/measured_vs_plan')):
            assert value >= 0, path  # a model this tiny may not move the RSS at all
        else:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), path
            assert math.isfinite(value) and value > 0, (path, value)
    assert data['methods']['ponderlm2-k1']['train']['flops_vs_vanilla'] > 1


def test_json_echoes_the_config_under_its_keys(run):
    _, data = run
    config = data['config']
    assert config['model'] == '' and 'preset' not in config and 'task' not in config
    assert config['method_settings']['ponderlm2-k2'] == {'n_thoughts': 2, 'n_ponder': 0, 'n_pause': 0, 'n_loop': 0,
                                                         'n_hidden': 0}
    assert config['attention'] == 'blocks'  # a CPU, fp32, 32 positions


@pytest.mark.parametrize('args,message', [
    (['--model=pythia-3m'], "unknown preset 'pythia-3m'"),
    (['--methods=vanilla,ponderlm3'], "unknown method 'ponderlm3'"),
    (['--methods=ponderlm2-k0'], "method 'ponderlm2-k0' has K or N 0"),
    (['--prompt_len=30'], 'exceeds block_size'),
    (['--peak_seconds=0'], 'peak_seconds must be > 0, got 0'),
    (['--preset=pythia-14m'], "unknown config key 'preset'"),  # renamed model=, as train.py says
    (['--dtype=float16'], 'needs CUDA'),
    (['--task=vanilla:turbo'], 'variant one of main, compile, sdpa, checkpoint, memory, hf, td or gG (G >= 1), got'),
    (['--grad_passes=0,1'], "grad_passes must be whole numbers >= 1, comma-separated (e.g. 1,2), or '', got"),
    (['--thought_dropout=1.0'], 'thought_dropout must be a probability in [0, 1), got 1.0'),
])
def test_mistakes_are_one_error_line_and_exit_2(args, message):
    proc = bench(*TINY, *args)
    assert proc.returncode == 2
    lines = without_echo(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr


# the smallest bench, of one method: its mistakes are refused before it measures anything
BENCH = ['--model=', '--n_layer=1', '--n_head=2', '--n_embd=16', '--vocab_size=64', '--block_size=16',
         '--batch_size=1', '--prompt_len=2', '--new_tokens=2', '--new_tokens_uncached=2', '--warmup=0', '--repeats=1',
         '--methods=vanilla', '--compare_compile=False', '--compare_checkpointing=False', '--check_memory=False',
         '--device=cpu']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A directory of the user's, with a file, notes.txt, where a directory would have to be."""
    root = tmp_path_factory.mktemp('user')
    (root / 'notes.txt').write_text('my notes')
    return root


@pytest.mark.parametrize('arg, needles, absent', [
    ('--n_head=0', ['n_head must be >= 1, got 0'], []),
    ('--threads=-1', ['threads must be >= 0, got -1'], ['warmup', 'n_jacobi']),
    ('--vocab_size=0', ['vocab_size must be >= 1, got 0'], []),
    ('--n_layer=-1', ['n_layer must be >= 1, got -1'], []),
    ('--json={run}/notes.txt/bench.json', ['--json', 'notes.txt is a file, not a directory'], []),
    ('--json={run}', ['--json', 'is a directory'], []),
    ('--peak_seconds=1e999', ['peak_seconds must be < 3600', 'got inf'], []),  # failed in every child
    ('--seed=18446744073709551616', ['seed must be a whole number in', '18446744073709551616'], []),
])
def test_bench_mistakes_are_one_line_before_measuring(run_dir, arg, needles, absent):
    before = checksums(run_dir)
    r = bench(*BENCH, arg.format(run=run_dir))
    assert_one_error(r, 2, *needles)
    error = r.stderr.strip().splitlines()[-1]
    assert not any(word in error for word in absent), error
    assert 'measuring' not in r.stderr and checksums(run_dir) == before


def test_a_child_measures_one_task_from_its_config_key():
    proc = bench(*TINY, '--task=ponderlm1-n3:main')
    assert proc.returncode == 0, proc.stderr
    lines = without_echo(proc.stdout)
    assert len(lines) == 1 and lines[0].startswith('result: '), proc.stdout
    result = json.loads(lines[0][len('result: '):])
    assert len(result['step_s']) == 2 and len(result['cached']) == 2
    # against this machine's measured matmul peak on a CPU: a share of it
    assert isinstance(result['mfu'], float) and 0 < result['mfu'] < 1, result['mfu']
    assert set(result) == {'step_s', 'peak_mem_mib', 'base_mem_mib', 'flops_per_token', 'mfu', 'matmul_peak_now',
                           'cached', 'uncached'}  # profile=False: no profile


BASELINES = {'vanilla': 'vanilla', 'pause-k1': 'Pause K=1', 'loop-k1': 'Loop K=1', 'hidden-n1': 'Hidden N=1'}


def test_the_baselines_get_a_row_in_every_table(monkeypatch, capsys, tmp_path):
    """bench.py --methods=vanilla,pause-k1,loop-k1,hidden-n1 at the tiny shape, with each child's measurement run
    in this process (a child process per method and variant costs seconds of importing torch; the plumbing is
    the module fixture's): training, cached and uncached decoding, checkpointing and the memory plan. One thread,
    as the children have under ENV: two threads on shared cores take several times as long."""
    from experiments import bench as b
    import configurator
    for arg in TINY + [f'--methods={",".join(BASELINES)}', f'--json={tmp_path / "bench.json"}', '--threads=1']:
        monkeypatch.setattr(b, *configurator.parse_override(arg, configurator.known_config(vars(b))))
    monkeypatch.setattr(b, 'run_child', lambda name, variant: json.loads(json.dumps(b.measure(name, variant))))
    threads = torch.get_num_threads()
    try:
        b.bench_all()
    finally:
        torch.set_num_threads(threads)  # bench sets the process's threads: the other tests keep theirs
    stdout = capsys.readouterr().out
    for title in ('training', 'decoding', 'training variants', 'memory'):
        assert [row[0] for row in table_rows(stdout, title)[1:]] == list(BASELINES.values()), title
    with open(tmp_path / 'bench.json') as f:
        methods = json.load(f)['methods']
    flops = {name: methods[name]['train']['flops_vs_vanilla'] for name in BASELINES}
    # Loop K=1 and Hidden N=1 both run the trunk twice and the vocabulary once; Pause K=1 runs it once over 2T
    # slots, whose attention spans a context twice as long
    assert flops['vanilla'] == 1 and 1 < flops['loop-k1'] == flops['hidden-n1'] < flops['pause-k1'] < 2.5, flops
    for name in BASELINES:
        assert all(methods[name]['decode'][mode]['tokens_per_s']['median'] > 0 for mode in ('cached', 'uncached'))
        assert methods[name]['memory']['plain']['plan_mib'] > methods[name]['memory']['checkpointing']['plan_mib']


def test_profile_reports_the_matmul_share_of_one_training_step(monkeypatch, capsys, tmp_path):
    """--profile=True at the tiny shape for vanilla alone, its main child run in this process (as above): the
    JSON's profile (the matmuls' share of the ops' self time, torch.profiler's table) and its report section."""
    from experiments import bench as b
    import configurator
    for arg in TINY + ['--methods=vanilla', '--profile=True', '--compare_checkpointing=False',
                       '--check_memory=False', '--compare_hf=False', f'--json={tmp_path / "bench.json"}',
                       '--threads=1']:
        monkeypatch.setattr(b, *configurator.parse_override(arg, configurator.known_config(vars(b))))
    variants = []
    monkeypatch.setattr(b, 'run_child', lambda name, variant: variants.append(variant) or
                        json.loads(json.dumps(b.measure(name, variant))))
    threads = torch.get_num_threads()
    try:
        b.bench_all()
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert variants == ['main']  # the profile is the main child's, no child of its own
    with open(tmp_path / 'bench.json') as f:
        profile = json.load(f)['methods']['vanilla']['profile']
    assert set(profile) == {'matmul_share', 'table'}
    assert 0 < profile['matmul_share'] <= 1, profile['matmul_share']  # every Linear is an aten::addmm or aten::mm
    assert 'aten::' in profile['table'] and 'Self CPU' in profile['table']
    heading = (f"## profile of one training step: vanilla (matmuls {100 * profile['matmul_share']:.0f}% of the ops' "
               f"self time)")
    assert heading in stdout.splitlines(), stdout
    assert profile['table'].strip() in stdout[stdout.index(heading):]  # the table follows its heading


def test_import_has_no_side_effects(monkeypatch, capsys):
    """`import bench` only defines things: no configurator (it would parse pytest's argv), no child
    processes, no measurement, sys.argv untouched; the config keys keep their defaults."""
    argv = ['bench.py', '--model=pythia-3m', '--task=vanilla:main', '--_task=vanilla:main']
    monkeypatch.setattr(sys, 'argv', list(argv))

    def no_subprocess(*args, **kwargs):
        raise AssertionError('import bench started a process')

    monkeypatch.setattr(subprocess, 'run', no_subprocess)
    monkeypatch.delitem(sys.modules, 'experiments.bench', raising=False)
    bench_module = importlib.import_module('experiments.bench')
    assert sys.argv == argv
    assert capsys.readouterr() == ('', '')
    assert bench_module.model == 'pythia-70m' and bench_module.task == ''
    assert 'preset' not in bench_module.CONFIG_KEYS and 'task' in bench_module.CONFIG_KEYS
    assert bench_module.child_command('vanilla', 'sdpa')[-1] == '--task=vanilla:sdpa'


FAULTS_OF_REUSE = r"""
import resource, sys, torch
from nanoponder.runtime import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])

def faults():  # minor page faults of 4 steps that each make and free a 64 MiB tensor, as a training step does
    for _ in range(12):  # the first few (up to 8 here) grow the heap: torch's posix_memalign asks a little more
        torch.empty(16 << 20).fill_(1.0)  # than the freed block, until the small pieces it split off are merged
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or __import__('platform').libc_ver()[0] != 'glibc',
                    reason='keep_freed_memory tunes glibc malloc')
@pytest.mark.parametrize('device_type, env, applies', [('cpu', {}, True), ('cuda', {}, False),
                                                       ('cpu', {'MALLOC_MMAP_THRESHOLD_': '65536'}, False)])
def test_keep_freed_memory_stops_the_page_faults_of_big_tensors(device_type, env, applies):
    """A 64 MiB tensor made and freed again and again: 16K fresh pages every time under glibc's default (each one
    mmapped and unmapped), none once keep_freed_memory applies and the heap has grown; it leaves a GPU run and a
    user's own MALLOC_* setting alone."""
    proc = subprocess.run([sys.executable, '-c', FAULTS_OF_REUSE, device_type], cwd=ROOT, env={**ENV, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    applied, n_faults = proc.stdout.split()
    assert applied == str(applies)
    if applies:
        assert int(n_faults) < 1000, n_faults
    else:
        assert int(n_faults) > 4 * 16000 * 0.9, n_faults


def test_a_shape_key_with_a_preset_is_the_model_measured(monkeypatch):
    """--model=pythia-14m --n_layer=2 measures pythia-14m's width at 2 layers (it measured all 6 while bench.json
    recorded n_layer 2), as train.py reads the same keys; 0 keeps the preset's."""
    from experiments import bench as b
    monkeypatch.setattr(b, 'model', 'pythia-14m')
    assert (b.method_config('vanilla').n_layer, b.method_config('vanilla').n_embd) == (6, 128)
    monkeypatch.setattr(b, 'n_layer', 2)
    config = b.method_config('ponderlm2-k1')
    assert (config.n_layer, config.n_head, config.n_embd, config.n_thoughts) == (2, 4, 128, 1)
    assert '--n_layer=2' in b.child_command('ponderlm2-k1', 'main')  # the children build the same model
