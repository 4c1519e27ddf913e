"""
The options of sample.py, eval.py and bench.py, and configurator.py's messages and --help: each mistake runs the
exact command and expects one `error:` line (the last line of stderr), its exit code, no traceback, and the files
already there unchanged (checksums); output paths are refused before the work starts. CPU, no network.
"""
import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch

from nanoponder.tokenizer import load_tokenizer
from model import GPT, GPTConfig, sample
from nanoponder.checkpoint import Checkpoint
from helpers import ENV, ROOT, assert_one_error, checksums, write_checkpoint

WORDS = ['the', 'cat', 'dog', 'sat', 'on', 'a', 'mat', 'ran', 'far']
EVAL = ['--max_windows=2', '--max_jacobi=1', '--jacobi_tols=(0.01,)', '--device=cpu']
BENCH = ['--model=', '--n_layer=1', '--n_head=2', '--n_embd=16', '--vocab_size=64', '--block_size=16',
         '--batch_size=1', '--prompt_len=2', '--new_tokens=2', '--new_tokens_uncached=2', '--warmup=0', '--repeats=1',
         '--methods=vanilla', '--compare_compile=False', '--compare_checkpointing=False', '--check_memory=False',
         '--device=cpu']


def run(*cmd, env=ENV, shell_prefix=None):
    """python cmd... in the repository (after shell_prefix in bash, e.g. a ulimit)."""
    argv = [sys.executable, *cmd]
    if shell_prefix:
        argv = ['bash', '-c', f'{shell_prefix}; exec "$@"', 'bash', *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny PonderLM-2 ckpt.pt beside the data it names (prepare_data.py's, with its tokenizer.json), and a
    file, notes.txt, where a directory would have to be."""
    from prepare_data import prepare
    root = tmp_path_factory.mktemp('cli')
    rng = random.Random(0)
    (root / 'corpus.txt').write_text(''.join(' '.join(rng.choice(WORDS) for _ in range(10)) + '\n'
                                             for _ in range(60)), encoding='utf-8')
    prepare('text', input=str(root / 'corpus.txt'), tokenizer=tiny_tokenizer(WORDS), out_dir=str(root / 'data'),
            num_proc=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_thoughts=1))
    write_checkpoint(root / 'ckpt.pt', model, root / 'data')
    (root / 'notes.txt').write_text('my notes')
    return root


# ----------------------------------------------------------------------------- sample.py

@pytest.mark.parametrize('temperature', [1e-40, 1e-320])  # 1e-320 is below float32's range: 0 there
def test_the_sampler_at_a_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [2.0, -1.0, 2.0, 1.0]])
    torch.manual_seed(0)
    drawn = [sample(logits, temperature).flatten().tolist() for _ in range(50)]
    assert {d[0] for d in drawn} == {1} and {d[1] for d in drawn} == {0, 2}  # T -> 0: the maxima, ties shared
    assert sample(logits, temperature, top_k=2, top_p=0.5)[0].item() == 1


def test_sample_py_at_a_tiny_temperature_samples_greedily(run_dir):
    """--temperature=1e-40 overflowed to inf/nan in the sampler (a traceback); T -> 0 is greedy."""
    r = run('sample.py', f'--init_from={run_dir / "ckpt.pt"}', '--start=the cat', '--max_new_tokens=12',
            '--device=cpu', '--dtype=float32', '--temperature=1e-40')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    model = Checkpoint.load(str(run_dir / 'ckpt.pt')).build_model().eval()
    tok = load_tokenizer(str(run_dir / 'data' / 'tokenizer.json'))
    with torch.no_grad():
        greedy = model.generate(torch.tensor([tok.encode('the cat')]), 12, temperature=0)[0].tolist()
    assert r.stdout == tok.decode(greedy) + '\n'


@pytest.mark.parametrize('setting, needles', [
    ('--temperature=1e999', ['temperature=inf', 'finite']),
    ("top_p = float('nan')", ['top_p=nan', '(0, 1]']),
])
def test_a_non_finite_temperature_or_top_p_is_one_line(run_dir, tmp_path, setting, needles):
    if not setting.startswith('--'):  # nan has no literal: a config file sets it
        (tmp_path / 'cfg.py').write_text(setting + '\n')
        setting = str(tmp_path / 'cfg.py')
    before = checksums(run_dir)
    r = run('sample.py', setting, f'--init_from={run_dir / "ckpt.pt"}', '--device=cpu')
    assert_one_error(r, 2, *needles)
    assert r.stdout == '' and checksums(run_dir) == before


# ----------------------------------------------------------------------------- eval.py

def unwritable_parents():
    """Directories where not even root (as tests may run) can create a file: /proc, and /sys where that holds."""
    found = []
    for parent in ('/proc', '/sys'):
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            found.append((parent, e.strerror))
    return found


@pytest.mark.parametrize('out, tasks, needles', [
    ('{run}/notes.txt/x', '', ['--out', 'x.json', 'notes.txt is a file, not a directory']),
    ('{run}/notes.txt/sub/x', 'arc_easy', ['sub/x_tasks.json', 'notes.txt is a file, not a directory']),
] + [(f'{parent}/nanoponder-test', '', [f'no file can be created in {parent} ', why])
     for parent, why in unwritable_parents()])
def test_an_unusable_out_path_is_refused_before_the_evaluation(run_dir, out, tasks, needles):
    before = checksums(run_dir)
    args = [f'--tasks={tasks}'] if tasks else []
    r = run('eval.py', f'--init_from={run_dir / "ckpt.pt"}', f'--out={out.format(run=run_dir)}', *EVAL, *args)
    assert_one_error(r, 2, *needles)
    assert 'scoring' not in r.stderr and 'lm_eval' not in r.stderr  # nothing was evaluated
    assert checksums(run_dir) == before and (run_dir / 'notes.txt').read_text() == 'my notes'


@pytest.fixture(scope='module')
def evaluated(run_dir, tmp_path_factory):
    """eval.py --out=DIR (a directory): its results as DIR/eval.json and DIR/eval_jacobi.png."""
    out = tmp_path_factory.mktemp('results')
    r = run('eval.py', f'--init_from={run_dir / "ckpt.pt"}', f'--out={out}', *EVAL)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_eval_stdout_is_its_table_and_a_directory_out_gets_eval_files(evaluated):
    out, r = evaluated
    assert sorted(os.listdir(out)) == ['eval.json', 'eval_jacobi.png']
    assert 'config:' not in r.stdout and 'config: max_windows = 2' in r.stderr  # the echo is on stderr
    assert 'PonderLM-2 K=1' in r.stdout.splitlines()[0] and '| exact (sequential' in r.stdout


def test_a_full_disk_while_writing_the_plot_is_one_line_and_keeps_the_old_plot(evaluated, run_dir):
    """ulimit -f 20: a write past 20 KiB fails (File too large), as on a full disk: the json (~2 KB) is written, the
    PNG (~50 KB) is not, and the earlier PNG stays whole."""
    out, _ = evaluated
    before = checksums(out)
    r = run('eval.py', f'--init_from={run_dir / "ckpt.pt"}', f'--out={out}', *EVAL, shell_prefix='ulimit -f 20')
    assert_one_error(r, 1, f'could not write {out / "eval_jacobi.png"}', 'the earlier eval_jacobi.png is unchanged',
                     f'the new results are in {out / "eval"}.json')
    assert checksums(out)['eval_jacobi.png'] == before['eval_jacobi.png']
    assert sorted(os.listdir(out)) == sorted(before)  # no temp file left


def test_offline_tasks_are_one_line_naming_what_to_do(run_dir, tmp_path):
    """A task whose data is on the Hub (arc_easy's own dataset), offline with an empty cache: lm-eval's datasets
    raise ConnectionError. The task is given in --task_dir: indexing lm-eval's thousands of stock tasks costs 7 s
    and reaches the same download."""
    pytest.importorskip('lm_eval')
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'hub_arc.yaml').write_text(
        'task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n'
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: 0\n'
        'doc_to_choice: "{{choices.text}}"\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n')
    env = {**ENV, 'HF_HOME': str(tmp_path / 'hf'), 'HF_DATASETS_CACHE': str(tmp_path / 'hf' / 'datasets')}  # empty
    r = run('eval.py', f'--init_from={run_dir / "ckpt.pt"}', '--tasks=hub_arc', f'--task_dir={tmp_path / "tasks"}',
            '--limit=2', f'--out={tmp_path / "x"}', '--device=cpu', env=env)
    assert_one_error(r, 1, 'could not get the data of hub_arc', 'allenai/ai2_arc', 'HF_DATASETS_OFFLINE',
                     '--task_dir')
    assert not os.path.exists(tmp_path / 'x_tasks.json')


# ----------------------------------------------------------------------------- bench.py

@pytest.mark.parametrize('arg, needles, absent', [
    ('--n_head=0', ['n_head must be >= 1, got 0'], []),
    ('--threads=-1', ['threads must be >= 0, got -1'], ['warmup', 'n_jacobi']),
    ('--vocab_size=0', ['vocab_size must be >= 1, got 0'], []),
    ('--n_layer=-1', ['n_layer must be >= 1, got -1'], []),
    ('--json={run}/notes.txt/bench.json', ['--json', 'notes.txt is a file, not a directory'], []),
    ('--json={run}', ['--json', 'is a directory'], []),
])
def test_bench_mistakes_are_one_line_before_measuring(run_dir, arg, needles, absent):
    before = checksums(run_dir)
    r = run('experiments/bench.py', *BENCH, arg.format(run=run_dir))
    assert_one_error(r, 2, *needles)
    error = r.stderr.strip().splitlines()[-1]
    assert not any(word in error for word in absent), error
    assert 'measuring' not in r.stderr and checksums(run_dir) == before


# ----------------------------------------------------------------------------- configurator.py

def test_a_directory_as_config_file_says_it_is_one(tmp_path):
    (tmp_path / 'my_config.py').write_text('batch_size = 2\n')
    r = run('train.py', str(tmp_path), '--device=cpu')
    assert_one_error(r, 2, 'is a directory, not a config file', 'key = value', 'my_config.py')
    assert 'not found' not in r.stderr


def test_train_help_shows_each_key_with_its_value_and_comment():
    r = run('train.py', '--help')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith('  --')}
    assert 'peak' in lines['--learning_rate=0.001']
    assert 'iterations between evaluations' in lines['--eval_interval=500']
    assert 'running mean' in lines['--beta1=0.9']
    assert 'AdamW' not in lines['--learning_rate=0.001']  # the section heading above it is no part of its comment


@pytest.mark.parametrize('script, key, words', [
    ('sample', '--temperature=0.8', '0 = greedy'),
    ('sample', '--jacobi_tol=None', '0 = exact'),  # a comment continued on the line below
    ('eval', "--out=''", 'results path'),
    ('experiments.bench', "--json=''", 'JSON'),
    ('prepare_data', "--dataset='minipile'", 'shakespeare'),
    ('export_hf', "--out=''", 'directory'),
])
def test_every_scripts_help_has_the_comments_of_its_keys(script, key, words):
    """format_help on each script's own globals (imported here: the same text as `python SCRIPT.py --help`)."""
    import importlib
    import configurator
    module = importlib.import_module(script)
    text = configurator.format_help(vars(module), module.__file__)
    assert text.startswith(module.__doc__.strip().splitlines()[0])
    line = next(line for line in text.splitlines() if line.startswith(f'  {key} '))
    assert words in line, line
