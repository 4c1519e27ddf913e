"""eval.py's loss mode, offline on the CPU with tiny models made here and a byte-level BPE tokenizer trained here:
the sliding windows score every target once, bits per byte, the loss of a vanilla model and the exact loss of a
thought model against plain references, the command line on a checkpoint (its table, JSON and plot), and its
mistakes: one `error:` line, an unusable output path refused before the evaluation, a full disk that keeps the old
plot. Its downstream mode (lm-eval's tasks): test_lm_eval.py.

    python -m pytest tests/test_eval.py -q
"""
import json
import math
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
from model import GPT, GPTConfig
from nanoponder.batches import sliding_windows, utf8_bytes
from helpers import ENV, ROOT, assert_one_error, checksums, randomize, tiny, write_checkpoint

WORDS = ['the', 'cat', 'dog', 'sat', 'on', 'a', 'mat', 'ran', 'far', 'red', 'café', 'naïve', '日本語', '🙂']


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    return tiny_tokenizer(WORDS, max_words=10)


# -----------------------------------------------------------------------------
# eval.py: windows, bytes, loss

@pytest.mark.parametrize('n,block,stride', [(2, 4, 4), (10, 4, 4), (11, 4, 4), (23, 8, 3), (9, 8, 1), (100, 16, 16)])
def test_sliding_windows_score_every_target_once(n, block, stride):
    windows = sliding_windows(n, block, stride)
    scored = [i for start, end, first in windows for i in range(first, end)]
    assert scored == list(range(1, n))  # each target exactly once, in order
    for k, (start, end, first) in enumerate(windows):
        assert end - start - 1 <= block and start < first <= end
        if k:  # later windows keep at least block - stride tokens of context (where the text has them)
            assert first - start - 1 >= min(block - stride, first - 1)


def test_utf8_bytes_of_documents_and_their_separators(tok):
    docs = ['the café 🙂 sat', 'naïve 日本語 dog\n', 'a']
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    assert utf8_bytes(tok, ids) == sum(len(d.encode('utf-8')) for d in docs) + len(docs)
    assert utf8_bytes(tok, tok.encode(docs[0])) == len(docs[0].encode('utf-8'))


def reference_nats(model, ids, windows):
    """Summed nats, one window at a time with a plain forward (vanilla: no thoughts)."""
    total = 0.0
    for start, end, first in windows:
        x = torch.tensor(ids[start:end - 1])[None]
        logits, _ = model(x)
        targets = torch.tensor(ids[first:end])
        total += F.cross_entropy(logits[0, first - start - 1:], targets, reduction='sum').item()
    return total


@pytest.mark.parametrize('stride', [16, 5])
def test_vanilla_loss_and_bits_per_byte(tok, stride):
    model = randomize(tiny(vocab_size=300), std=0.1)
    text = 'the cat sat on a mat 🙂 and the dog ran far, naïve café ' * 4
    ids = np.array([tok.eos_id] + tok.encode(text))
    windows = sliding_windows(len(ids), 16, stride)
    totals = ev.evaluate_loss(model, ids, windows, torch.no_grad(), 'cpu', 3, 0, (), False)
    (row,) = ev.loss_rows(totals, len(ids) - 1, utf8_bytes(tok, ids[1:]), 0, ())
    want = reference_nats(model, ids, windows)
    assert row['loss'] == pytest.approx(want / (len(ids) - 1), rel=1e-5)
    assert row['bits_per_byte'] == pytest.approx(want / (math.log(2) * len(text.encode('utf-8'))), rel=1e-5)


def thought_rows(model, ids, block, max_r, tols=()):
    windows = sliding_windows(len(ids), block, block)
    totals = ev.evaluate_loss(model, ids, windows, torch.no_grad(), 'cpu', 4, max_r, tols, True)
    return {r['name']: r for r in ev.loss_rows(totals, len(ids) - 1, len(ids), max_r, tols)}


@pytest.mark.parametrize('K', [1, 2])
def test_exact_loss_is_sequential_logits_and_jacobi_reaches_it_at_the_bound(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    block = 6
    ids = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(K)).numpy()
    bound = K * (block - 1)
    rows = thought_rows(model, ids, block, bound, tols=(0.0,))
    want = 0.0
    for start, end, first in sliding_windows(len(ids), block, block):
        logits = model.sequential_logits(torch.tensor(ids[start:end - 1])[None])
        want += F.cross_entropy(logits[0], torch.tensor(ids[start + 1:end]), reduction='sum').item()
    assert rows['exact']['loss'] == pytest.approx(want / (len(ids) - 1), rel=1e-6)
    assert rows[f'R={bound}']['loss'] == pytest.approx(rows['exact']['loss'], rel=1e-6)
    assert rows['tol=0']['loss'] == pytest.approx(rows['exact']['loss'], rel=1e-6)
    assert rows[f'R={bound}']['distance_to_exact'] < 1e-5
    assert rows['R=0']['distance_to_exact'] > 1e-3 and abs(rows['R=0']['loss'] - rows['exact']['loss']) > 1e-4


# -----------------------------------------------------------------------------
# eval.py from the command line

def run_eval(*args, env=ENV, shell_prefix=None):
    """python eval.py args... in the repository (after shell_prefix in bash, e.g. a ulimit)."""
    argv = [sys.executable, 'eval.py', *args]
    if shell_prefix:
        argv = ['bash', '-c', f'{shell_prefix}; exec "$@"', 'bash', *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_loss_of_a_checkpoint_on_its_own_data(tmp_path, tokenizer_json):
    from prepare_data import prepare
    corpus = tmp_path / 'corpus.txt'
    rng = random.Random(0)
    corpus.write_text(''.join(' '.join(rng.choice(WORDS) for _ in range(10)) + '\n' for _ in range(120)),
                      encoding='utf-8')  # val: 6 of the 12 held-out lines, more than 5 windows of 16 tokens
    prepare('text', input=str(corpus), tokenizer=tokenizer_json, out_dir=str(tmp_path / 'data'), num_proc=1)
    model = randomize(tiny(n_thoughts=1, vocab_size=300, block_size=16), std=0.1)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path / 'data')
    r = run_eval(f'--init_from={tmp_path / "ckpt.pt"}', '--max_windows=5', '--max_jacobi=2', '--jacobi_tols=(0.01,)',
                 '--dtype=float32')
    assert r.returncode == 0, r.stderr
    assert 'note:' not in r.stderr  # nothing to say about these options
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert (tmp_path / 'eval_jacobi.png').stat().st_size > 1000
    assert [row['name'] for row in report['rows']] == ['R=0', 'R=1', 'R=2', 'tol=0.01', 'exact']
    assert report['tokens'] == 5 * 16 and report['kv_cache_bytes_per_token'] == 2 * 2 * 32 * 4 * 2
    assert '| exact (sequential, KV cache) |' in r.stdout and 'KV cache: 1,024 bytes per token' in r.stdout
    # the test split: its own eval_test.json beside the checkpoint, the val results left as they were
    before = (tmp_path / 'eval.json').read_bytes()
    r = run_eval(f'--init_from={tmp_path / "ckpt.pt"}', '--max_windows=5', '--max_jacobi=1', '--jacobi_tols=()',
                 '--dtype=float32', '--split=test')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'eval.json').read_bytes() == before
    test_report = json.loads((tmp_path / 'eval_test.json').read_text())
    assert 'test' in test_report['data'] and 'val' in report['data']
    assert test_report['rows'][0]['loss'] != report['rows'][0]['loss']


def test_options_that_do_nothing_here_are_said_and_max_jacobi_stops_where_every_thought_is_exact(monkeypatch, capsys,
                                                                                                tmp_path, tokenizer_json):
    """--thoughts=jacobi (and n_jacobi, jacobi_tol) without --tasks and --tokenizer on a prepared split were ignored
    silently: a note each. --max_jacobi far beyond the K(T-1) passes that make every thought exact spun on: the rows
    end there, with a note. --out=x.json wrote x.json.json."""
    from prepare_data import prepare
    (tmp_path / 'corpus.txt').write_text('the cat sat on a mat\n' * 40, encoding='utf-8')
    prepare('text', input=str(tmp_path / 'corpus.txt'), tokenizer=tokenizer_json, out_dir=str(tmp_path / 'data'),
            num_proc=1)
    write_checkpoint(tmp_path / 'ckpt.pt', tiny(n_thoughts=1, vocab_size=300, block_size=8), tmp_path / 'data')
    capsys.readouterr()
    run_main(monkeypatch, init_from=str(tmp_path / 'ckpt.pt'), out=str(tmp_path / 'x.json'), max_windows=2,
             max_jacobi=1000, jacobi_tols=(), thoughts='jacobi', tokenizer=tokenizer_json, device='cpu')
    err = capsys.readouterr().err
    assert 'note: thoughts, n_jacobi and jacobi_tol choose how --tasks scores' in err
    assert '--tokenizer is not used on a prepared split' in err
    assert 'max_jacobi=1000 is past the K(T-1) = 7 passes' in err
    rows = json.loads((tmp_path / 'x.json').read_text())['rows']
    assert [r['name'] for r in rows] == [f'R={r}' for r in range(8)] + ['exact']
    assert rows[7]['loss'] == pytest.approx(rows[-1]['loss'], abs=1e-5)  # R=7 is the exact loss already
    run_main(monkeypatch, split='test', out=str(tmp_path / 'test.json'), max_jacobi=2)  # prepare_data's test split
    report = json.loads((tmp_path / 'test.json').read_text())
    assert report['data'].endswith(' test') and report['tokens'] == os.path.getsize(tmp_path / 'data' / 'test.bin') // 2 - 1


def run_main(monkeypatch, **config):
    """eval.main() in this process with config keys set, as --key=value would set them."""
    for key, value in config.items():
        assert hasattr(ev, key), key
        monkeypatch.setattr(ev, key, value)
    return ev.main()


@pytest.mark.parametrize('config,match', [
    (dict(init_from='/no/such/ckpt.pt'), 'no such file or directory: /no/such/ckpt.pt'),
    (dict(init_from='/no/such/dir'), 'no such file or directory: /no/such/dir'),
    (dict(thoughts='magic'), 'thoughts must be'), (dict(jacobi_tols=(-1,)), 'jacobi_tols'),
    (dict(stride=-1), 'stride must be >= 0, got -1'),
    (dict(n_jacobi=2.5), 'n_jacobi must be a whole number >= 0'),  # was a TypeError traceback in think
    (dict(tasks='piqa', think_thresholds=(0.5, 0.9)), 'a sweep of --think_thresholds read a text'),  # one τ only
    (dict(tasks='piqa', think_thresholds=(0.5,), thoughts='jacobi'), '--thoughts=jacobi cannot'),
    (dict(think_thresholds=(1, 1.5)), 'think_thresholds must be numbers in \\[0, 1\\]'),
    (dict(tasks=','), "tasks=',' names no task"),  # was lm-eval's ValueError after 25 s of loading
    (dict(seed=2 ** 64), 'seed must be a whole number in'),  # was torch's "Overflow when unpacking long long"
    (dict(tasks='lambada_openai', seed=2 ** 32), 'seed must be a whole number in \\[0, 4,294,967,295\\]')])
def test_mistakes_are_user_errors(monkeypatch, tmp_path, config, match):
    with pytest.raises(ev.UserError, match=match):
        run_main(monkeypatch, out=str(tmp_path / 'x'), **config)


def test_a_mistake_on_the_command_line_is_one_error_line(tmp_path):
    r = run_eval('--init_from=/no/such/ckpt.pt', f'--out={tmp_path}/x')
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert r.returncode == 2 and len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# where eval.py writes: output paths are refused before the evaluation, and the files already there stay unchanged

EVAL = ['--max_windows=2', '--max_jacobi=1', '--jacobi_tols=(0.01,)', '--device=cpu']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny PonderLM-2 ckpt.pt beside the data it names (prepare_data.py's, with its tokenizer.json), and a
    file, notes.txt, where a directory would have to be."""
    from prepare_data import prepare
    root = tmp_path_factory.mktemp('cli')
    words = WORDS[:9]  # the ASCII ones
    rng = random.Random(0)
    (root / 'corpus.txt').write_text(''.join(' '.join(rng.choice(words) for _ in range(10)) + '\n'
                                             for _ in range(60)), encoding='utf-8')
    prepare('text', input=str(root / 'corpus.txt'), tokenizer=tiny_tokenizer(words), out_dir=str(root / 'data'),
            num_proc=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_thoughts=1))
    write_checkpoint(root / 'ckpt.pt', model, root / 'data')
    (root / 'notes.txt').write_text('my notes')
    return root


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
    r = run_eval(f'--init_from={run_dir / "ckpt.pt"}', f'--out={out.format(run=run_dir)}', *EVAL, *args)
    assert_one_error(r, 2, *needles)
    assert 'scoring' not in r.stderr and 'lm_eval' not in r.stderr  # nothing was evaluated
    assert checksums(run_dir) == before and (run_dir / 'notes.txt').read_text() == 'my notes'


@pytest.fixture(scope='module')
def evaluated(run_dir, tmp_path_factory):
    """eval.py --out=DIR (a directory): its results as DIR/eval.json and DIR/eval_jacobi.png."""
    out = tmp_path_factory.mktemp('results')
    r = run_eval(f'--init_from={run_dir / "ckpt.pt"}', f'--out={out}', *EVAL)
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
    r = run_eval(f'--init_from={run_dir / "ckpt.pt"}', f'--out={out}', *EVAL, shell_prefix='ulimit -f 20')
    assert_one_error(r, 1, f'could not write {out / "eval_jacobi.png"}', 'the earlier eval_jacobi.png is unchanged',
                     f'the new results are in {out / "eval"}.json')
    assert checksums(out)['eval_jacobi.png'] == before['eval_jacobi.png']
    assert sorted(os.listdir(out)) == sorted(before)  # no temp file left
