"""
train.py never loses what the user has, and every mistake is one line: each case runs the exact command, expects one
`error:` line and its exit code, and checks (checksums before and after) that the files already there are unchanged.
Also: Ctrl-C with stdout piped into a process that has exited still saves, the lock refuses a second run, stale temp
files and locks of killed runs are cleaned up, a full disk during a save keeps the checkpoints (exit 1),
--overwrite=True leaves none of the old run's files, and a log written to a file (or to a terminal that reports no
size) has a plain line per log_interval.

    python -m pytest tests/test_train_safety.py -q
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, ROOT, TINY, assert_one_error, checksums, digest, load_ckpt, make_data, metrics, run_train


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 6-iteration run: the out_dir whose files the mistakes below must leave alone."""
    tmp = tmp_path_factory.mktemp('finished')
    make_data(tmp / 'data')
    run_train(tmp, '--max_iters=6', '--eval_interval=3')
    return tmp


def test_best_pt_is_the_best_saved_checkpoint(finished):
    """Even when the unsaved start (iteration 0) had the lowest val loss, best.pt is the best of the saved ones."""
    entries = map(json.loads, open(finished / 'out' / 'metrics.jsonl'))
    val = {e['iter']: e['val_loss'] for e in entries if 'val_loss' in e}
    saved = {it: loss for it, loss in val.items() if it > 0}
    assert load_ckpt(finished / 'out' / 'best.pt')['iter_num'] == min(saved, key=saved.get)


@pytest.mark.parametrize('args, needles', [
    (['--learning_rate=-1'], ['learning_rate', '> 0']),
    (['--beta1=1.5'], ['beta1', '[0, 1)']),
    (['--beta2=-0.1'], ['beta2']),
    (['--eps=0'], ['eps']),
    (['--weight_decay=-0.1'], ['weight_decay', '>= 0']),
    (['--grad_clip=-1'], ['grad_clip', '>= 0']),
    (['--device=tpu'], ['tpu']),
    (['--device=cuda'], ['cuda', 'not available']),
    (['--dtype=float8'], ['dtype']),
    (['--out_dir='], ['out_dir is empty']),
    (['--jacobi_train_range=(3,1)'], ['jacobi_train_range']),
    (["--jacobi_train_range=('a','b')"], ['jacobi_train_range', 'two whole numbers']),
    (['--jacobi_train_range=(1.5,2)'], ['jacobi_train_range', 'two whole numbers']),  # was torch.randint's TypeError
    (['--seed=100000000000000000000'], ['seed must be in [0, ', '63 bits']),
    (['--vocab_size=-5'], ['vocab_size', '>= 1']),
    (['--min_lr_ratio=5', '--warmup_ratio=3'], ['warmup_ratio', '[0, 1]']),
    (['--weight_decay=1e999'], ['weight_decay', 'finite', 'inf']),
    (['--max_iters=1e20'], ['max_iters', '<= 1e+12']),
    (['--max_iters=0', '--num_epochs=1e15'], ['num_epochs', 'iterations', 'lower num_epochs']),
    # Pause's row is a token of the data, and the embedding (vocab_size 128, the data's) has no row to spare
    (['--n_thoughts=0', '--n_pause=1', '--pause_token_id=5'],
     ['pause_token_id=5 is a token id of the data', 'meta.json', '--vocab_size=136', '--pause_token_id=135']),
    (['--n_thoughts=0', '--n_pause=-1'], ['n_pause must be >= 0, got -1']),  # was "all six counts ..."
    (['--n_thoughts=0', '--n_hidden=1', '--ponder_multiply=True'], ['ponder_multiply', 'n_ponder is 0']),  # silent
])
def test_bad_values_are_one_line_exit_2_and_touch_nothing(finished, args, needles):
    before = checksums(finished / 'out')
    r = run_train(finished, '--max_iters=8', '--init_from=resume', *args, check=False)
    assert_one_error(r, 2, *needles)
    assert checksums(finished / 'out') == before


def test_out_dir_that_is_a_file(tmp_path):
    make_data(tmp_path / 'data')
    (tmp_path / 'out').write_text('my notes')
    r = run_train(tmp_path, '--max_iters=2', check=False)
    assert_one_error(r, 2, 'is a file')
    assert (tmp_path / 'out').read_text() == 'my notes'


def test_a_resume_of_a_finished_run_says_there_is_nothing_to_train(finished):
    before = checksums(finished / 'out')
    r = run_train(finished, '--max_iters=4', '--init_from=resume', check=False)  # the checkpoint is at 6
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'nothing to train' in r.stdout and 'iteration 6' in r.stdout and 'saved' not in r.stdout.splitlines()[-1]
    assert checksums(finished / 'out') == before


def test_a_best_pt_alone_is_a_run_and_a_failed_command_leaves_no_empty_out_dir(finished, tmp_path):
    """A run whose ckpt.pt was moved away still has its best model: a new run into it is refused as for ckpt.pt.
    A new out_dir that a command made before failing its checks (here: ids beyond vocab_size) is removed again."""
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'best.pt').write_bytes((finished / 'out' / 'ckpt.pt').read_bytes())
    r = run_train(tmp_path, '--max_iters=2', data_dir=finished / 'data', check=False)
    assert_one_error(r, 2, 'already holds a run', 'best.pt', '--overwrite=True')
    assert digest(tmp_path / 'out' / 'best.pt') == digest(finished / 'out' / 'ckpt.pt')
    r = run_train(tmp_path, '--max_iters=2', '--vocab_size=8', data_dir=finished / 'data', out='new', check=False)
    assert r.returncode == 2 and not (tmp_path / 'new').exists(), r.stderr[-2000:]


def test_a_new_run_does_not_replace_a_finished_one(finished, tmp_path):
    before = checksums(finished / 'out')
    r = run_train(finished, '--max_iters=2', check=False)  # forgot --init_from=resume
    assert_one_error(r, 2, 'already holds a run', '--init_from=resume', '--overwrite=True')
    assert checksums(finished / 'out') == before
    # --overwrite=True does start over (on a copy, so the shared run stays as it was)
    (tmp_path / 'out').mkdir()
    for name in before:
        (tmp_path / 'out' / name).write_bytes((finished / 'out' / name).read_bytes())
    run_train(tmp_path, '--max_iters=2', '--eval_interval=1', '--overwrite=True', data_dir=finished / 'data')
    assert load_ckpt(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2
    train, val = metrics(tmp_path / 'out')
    assert [i for i, _ in train] == [1, 2] and [i for i, _ in val] == [0, 1, 2]  # the old lines are gone


def test_a_second_run_into_the_same_out_dir_is_refused(finished):
    before = checksums(finished / 'out')
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (finished / 'out' / 'train.lock').write_text(f'{sleeper.pid}\n')  # as a live run holds it
        r = run_train(finished, '--max_iters=8', '--init_from=resume', check=False)
        assert_one_error(r, 2, f'PID {sleeper.pid}', 'train.lock')
        assert (finished / 'out' / 'train.lock').read_text() == f'{sleeper.pid}\n'
    finally:
        sleeper.kill()
        sleeper.wait()
        (finished / 'out' / 'train.lock').unlink()
    assert checksums(finished / 'out') == before


def test_a_killed_run_leaves_nothing_that_blocks_the_next(tmp_path):
    make_data(tmp_path / 'data')
    run_train(tmp_path, '--max_iters=2', '--eval_interval=2')
    out = tmp_path / 'out'
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its lock and temp files are stale
    (out / 'train.lock').write_text(f'{dead_pid}\n')
    (out / f'ckpt.pt.tmp{dead_pid}').write_bytes(b'half a checkpoint')
    r = run_train(tmp_path, '--max_iters=3', '--eval_interval=3', '--init_from=resume')
    assert 'stale lock' in r.stdout and f'ckpt.pt.tmp{dead_pid}' in r.stdout
    assert {'ckpt.pt', 'loss.png', 'metrics.jsonl'} <= set(os.listdir(out)) <= {'best.pt', 'ckpt.pt', 'loss.png',
                                                                              'metrics.jsonl'}  # lock released
    assert load_ckpt(out / 'ckpt.pt')['iter_num'] == 3


def test_the_config_echo_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`python train.py ... | true` with unbuffered output: the reader is gone before the config echo is written.
    The script goes on to its own verdict (here the one error line of a missing data_dir), not a BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [sys.executable, 'train.py', *TINY, f'--data_dir={tmp_path / "none"}', f'--out_dir={tmp_path / "out"}']
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, 'PYTHONUNBUFFERED': '1'}, stdout=write_end, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(write_end)
    assert_one_error(r, 2, 'does not exist')


def test_ctrl_c_saves_even_when_the_pipe_reader_is_gone(tmp_path):
    """`python train.py ... | head -3`: the reader exits, every later print would fail; Ctrl-C must still save."""
    make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    cmd = [sys.executable, 'train.py', *TINY, f'--data_dir={tmp_path / "data"}', f'--out_dir={out}',
           '--max_iters=100000', '--eval_interval=100000', '--always_save_checkpoint=False']
    reader = subprocess.Popen([sys.executable, '-c', 'import sys; [sys.stdin.readline() for _ in range(3)]'],
                              stdin=subprocess.PIPE)
    stderr = open(tmp_path / 'stderr', 'w+')
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=reader.stdin, stderr=stderr)
    reader.stdin.close()  # only the trainer writes into the pipe now
    reader.wait(timeout=60)  # it read three lines and exited: the pipe is broken from here on
    log = out / 'metrics.jsonl'
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.2)  # training goes on past the broken pipe
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    stderr.seek(0)
    err = stderr.read()
    assert p.returncode == 130, err[-2000:]
    assert 'Traceback' not in err, err[-2000:]
    ckpt = load_ckpt(out / 'ckpt.pt')
    train, _ = metrics(out)
    assert ckpt['iter_num'] == train[-1][0] >= 4  # saved at the step boundary after the last logged iteration
    assert not (out / 'train.lock').exists()


def test_only_rank_0_reports_a_mistake_under_torchrun(tmp_path):
    r = run_train(tmp_path, '--max_iters=2', '--beta1=1.5', nproc=2, check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert errors == ['error: beta1 must be in [0, 1), got 1.5'], r.stderr[-3000:]
    assert r.stdout.count('config: beta1 = 1.5') == 1  # the config echo too, once


def test_a_log_in_a_file_has_a_plain_line_per_log_interval(tmp_path):
    r = run_train(tmp_path, '--max_iters=6', '--eval_interval=3', '--log_interval=2')  # stdout is a pipe here
    assert '\r' not in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith('iter ') and 'loss' in line and 'val' not in line]
    assert [line.split(':')[0] for line in lines] == ['iter 2/6', 'iter 4/6', 'iter 6/6'], r.stdout
    for line in lines:
        for field in ('loss ', 'lr ', 'tokens/s', 'mfu', 'eta'):
            assert field in line, line


def test_loss_plot_range_ignores_the_first_steps(tmp_path):
    """loss.png's y-range comes from the losses after warmup: the first steps' ~ln(V) must not flatten the rest."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from nanoponder.runlog import RunLog

    log = RunLog(str(tmp_path), log_interval=1, total_iters=100, warmup=5, iter_num=0)
    seen = {}
    original_close = plt.close
    plt.close = lambda fig: seen.setdefault('ylim', (fig.axes[0].get_ylim(), fig.axes[0].get_title()))
    try:
        for it in range(1, 101):
            log.record({'iter': it, 'loss': 11.0 if it < 3 else 3.0 - it / 100})
        log.record({'iter': 100, 'val_loss': 2.5})
    finally:
        plt.close = original_close
    (lo, hi), title = seen['ylim']
    assert lo < 2.5 and 2.9 < hi < 4  # not stretched up to 11
    assert '2 early points above the top, up to 11.00' in title  # and it says what it leaves out
    assert (tmp_path / 'loss.png').stat().st_size > 0


def test_a_checkpoint_of_the_previous_format_still_resumes(finished, tmp_path):
    """Format 1 (train.py before the format field) called weight_init `init`, with 'ponder' for 'small'."""
    import torch
    from nanoponder.checkpoint import Checkpoint
    ckpt = load_ckpt(finished / 'out' / 'ckpt.pt')
    del ckpt['format']
    ckpt['model_args']['init'] = {'small': 'ponder', 'normal': 'pythia'}[ckpt['model_args'].pop('weight_init')]
    ckpt['config']['init'] = {'small': 'ponder', 'normal': 'pythia'}[ckpt['config'].pop('weight_init')]
    (tmp_path / 'out').mkdir()
    torch.save(ckpt, tmp_path / 'out' / 'ckpt.pt')
    loaded = Checkpoint.load(str(tmp_path / 'out' / 'ckpt.pt'))
    assert loaded.model_args['weight_init'] == 'small' and loaded.config['weight_init'] == 'small'
    run_train(tmp_path, '--max_iters=8', '--eval_interval=4', '--init_from=resume', data_dir=finished / 'data')
    assert load_ckpt(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 8


def test_a_checkpoint_from_a_newer_format_is_one_line(finished, tmp_path):
    import torch
    ckpt = load_ckpt(finished / 'out' / 'ckpt.pt')
    ckpt['format'] = 99
    (tmp_path / 'out').mkdir()
    torch.save(ckpt, tmp_path / 'out' / 'ckpt.pt')
    r = run_train(tmp_path, '--max_iters=8', '--init_from=resume', data_dir=finished / 'data', check=False)
    assert_one_error(r, 2, 'format 99', 'update nanoPonder')


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(finished, tmp_path):
    """A train.bin whose ids do not fit its meta.json (here: the model's vocab_size) was an IndexError at the first
    batch that held one; now one line before training, naming the file and the id."""
    import numpy as np
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('meta.json', 'val.bin'):
        (data / name).write_bytes((finished / 'data' / name).read_bytes())
    ids = np.fromfile(finished / 'data' / 'train.bin', dtype=np.uint16)
    ids[1500] = 200  # >= VOCAB (128), which meta.json and the model have
    ids.tofile(data / 'train.bin')
    before = checksums(data)
    r = run_train(tmp_path, '--max_iters=2', check=False)
    assert_one_error(r, 2, f"{data / 'train.bin'} holds token id 200", "vocab_size is 128", 'prepare the data again')
    assert checksums(data) == before
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


def copy_of_run(src, out):
    """A copy of the run in src (ckpt.pt, best.pt, metrics.jsonl, loss.png) at out."""
    out.mkdir()
    for name in os.listdir(src):
        (out / name).write_bytes((src / name).read_bytes())
    return out


def test_a_full_disk_during_a_save_keeps_the_checkpoints(finished, tmp_path):
    """A file size limit (ulimit -f; Python ignores SIGXFSZ, so the write fails with EFBIG, as on a full disk)
    that the checkpoint does not fit: one line, exit 1, ckpt.pt and best.pt as they were, no temp file. The same
    resume changes the seed and asks for a warmup longer than the run: a note for each."""
    out = copy_of_run(finished / 'out', tmp_path / 'out')
    kept = {name: digest(out / name) for name in ('ckpt.pt', 'best.pt')}
    assert (out / 'ckpt.pt').stat().st_size > 200 * 1024  # (what the limit below must refuse)
    cmd = [sys.executable, 'train.py', *TINY, f"--data_dir={finished / 'data'}", f'--out_dir={out}', '--max_iters=7',
           '--eval_interval=100', '--init_from=resume', '--seed=7', '--warmup_iters=10']
    r = subprocess.run(['bash', '-c', 'ulimit -f 100 && exec "$@"', 'bash', *cmd], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)  # 100 KB: metrics.jsonl and loss.png fit
    assert_one_error(r, 1, f"could not write {out / 'ckpt.pt'}", 'File too large', 'unchanged')
    assert {name: digest(out / name) for name in kept} == kept
    assert sorted(os.listdir(out)) == ['best.pt', 'ckpt.pt', 'loss.png', 'metrics.jsonl']  # no temp file, no lock
    notes = [line for line in r.stdout.splitlines() if line.startswith('note:')]
    assert any('seed 7' in n and '1337' in n and 'not an exact resume' in n for n in notes), r.stdout[-2000:]
    assert any('warmup (10 iterations)' in n and 'never reaches its peak' in n for n in notes), r.stdout[-2000:]


def test_overwrite_removes_the_old_run_even_when_stopped_at_once(finished, tmp_path):
    """--overwrite=True, then SIGTERM before the new run's first evaluation saves: only the new run's files."""
    out = copy_of_run(finished / 'out', tmp_path / 'out')
    for name in ('eval.json', 'eval_test.json', 'eval_lens.png', 'eval_test_lens.png'):  # eval.py's results of the
        (out / name).write_text('{}')  # old model beside its checkpoint, the lens's picture too
    old_png = digest(out / 'loss.png')
    cmd = [sys.executable, 'train.py', *TINY, f"--data_dir={finished / 'data'}", f'--out_dir={out}',
           '--max_iters=100000', '--eval_interval=100000', '--overwrite=True']
    stdout = open(tmp_path / 'stdout', 'w+')
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and 'iter 2/100000' not in (tmp_path / 'stdout').read_text():
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    assert 'removed the previous run' in (tmp_path / 'stdout').read_text()
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'loss.png', 'metrics.jsonl']  # the old best.pt is gone
    iters = load_ckpt(out / 'ckpt.pt')['iter_num']
    train, val = metrics(out)
    assert [i for i, _ in train] == list(range(1, iters + 1)) and [i for i, _ in val] == [0]  # the new run's only
    assert digest(out / 'loss.png') != old_png


def test_a_terminal_that_reports_no_size_gets_plain_lines(tmp_path, monkeypatch, capsys):
    """0 columns and rows (some containers, serial consoles): tqdm would draw nothing at all."""
    from nanoponder import runlog

    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    monkeypatch.setattr(sys.stdout, 'fileno', lambda: 1)
    monkeypatch.setattr(runlog.os, 'get_terminal_size', lambda fd: os.terminal_size((0, 0)))
    log = runlog.RunLog(str(tmp_path), log_interval=1, total_iters=10, warmup=1, iter_num=0)
    assert log.bar is None
    log.say('a plain line')
    assert capsys.readouterr().out == 'a plain line\n'
    monkeypatch.setattr(runlog.os, 'get_terminal_size', lambda fd: os.terminal_size((80, 24)))
    log = runlog.RunLog(str(tmp_path), log_interval=1, total_iters=10, warmup=1, iter_num=0)
    assert log.bar is not None  # a terminal with a size keeps its bar
    log.close()


def test_the_newcomer_commands_make_what_the_configs_read():
    """train.py's docstring, its missing-data error and the README quick start give the prepare_data.py command
    that writes the data_dir the shakespeare configs read."""
    from nanoponder.data import prepare_command
    assert prepare_command('data/shakespeare-bpe512') == ('python prepare_data.py --dataset=shakespeare '
                                                          '--tokenizer=bpe:512')
    assert prepare_command('data/minipile') == 'python prepare_data.py --dataset=minipile'
    assert prepare_command('/elsewhere/mine').endswith('--out_dir=/elsewhere/mine')
    docs = (ROOT / 'train.py').read_text() + (ROOT / 'README.md').read_text()
    for config in ('shakespeare_ponder.py', 'shakespeare_vanilla.py'):
        scratch = {}
        exec((ROOT / 'config' / config).read_text(), scratch)
        assert prepare_command(scratch['data_dir']) in docs, config
    assert 'prepare_data.py --dataset=shakespeare &&' not in docs


def test_the_first_run_is_one_command_and_a_big_download_is_never_started_unasked(tmp_path, monkeypatch):
    """`python train.py config/shakespeare_ponder.py` prepares its missing data_dir first (the config names its
    dataset and tokenizer), with prepare_data.py's own code, saying so in one line; --input is the offline form. A
    missing MiniPile is one line naming the command unless --prepare=True, and so is any missing data under
    torchrun (every rank would wait for one); a config that names no dataset keeps the plain missing-data error."""
    from types import SimpleNamespace
    from nanoponder.prerun import data_to_prepare
    from nanoponder.runtime import UserError
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7))) for _ in range(400)]
    (tmp_path / 'text.txt').write_text(''.join(' '.join(rng.choice(words) for _ in range(12)) + '\n'
                                               for _ in range(600)))
    r = subprocess.run([sys.executable, 'train.py', 'config/shakespeare_ponder.py', f'--input={tmp_path / "text.txt"}',
                        f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--max_iters=1',
                        '--eval_iters=1', '--n_layer=1', '--dtype=float32'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f'note: data_dir {tmp_path / "data"} is missing: preparing it first') == 1
    assert 'python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512' in r.stdout
    assert sorted(os.listdir(tmp_path / 'data')) == ['meta.json', 'test.bin', 'tokenizer.json', 'train.bin', 'val.bin']
    assert (tmp_path / 'out' / 'ckpt.pt').exists()
    cfg = SimpleNamespace(data_dir=str(tmp_path / 'data'), dataset='shakespeare', tokenizer='bpe:512', input='',
                          prepare=False)
    assert not data_to_prepare(cfg, distributed=False)  # prepared: used as it is
    cfg.data_dir = str(tmp_path / 'missing')
    with pytest.raises(UserError, match='under torchrun no rank prepares it'):
        data_to_prepare(cfg, distributed=True)
    cfg.dataset, cfg.tokenizer = 'minipile', 'pythia'
    with pytest.raises(UserError, match='MiniPile is GBs to download.*python prepare_data.py --dataset=minipile.*'
                                        '--prepare=True'):
        data_to_prepare(cfg, distributed=False)
    cfg.dataset = ''
    assert not data_to_prepare(cfg, distributed=False) and not (tmp_path / 'missing').exists()
    # a directory of other files is never prepared into (an export's tokenizer.json would be replaced), nor is one
    # that prepare_data.py's default names put another dataset in; a missing text needs --input; a missing
    # checkpoint is said before the preparation
    (tmp_path / 'export').mkdir()
    (tmp_path / 'export' / 'tokenizer.json').write_text('mine')
    cfg.dataset, cfg.tokenizer, cfg.data_dir, cfg.init_from, cfg.out_dir = ('shakespeare', 'bpe:512',
                                                                           str(tmp_path / 'export'), 'scratch', 'o')
    with pytest.raises(UserError, match='holds tokenizer.json but no meta.json: it is no prepared data directory'):
        data_to_prepare(cfg, distributed=False)
    assert (tmp_path / 'export' / 'tokenizer.json').read_text() == 'mine'
    monkeypatch.chdir(tmp_path)  # (data/ of the repository may hold prepared data)
    cfg.data_dir, cfg.tokenizer = 'data/shakespeare-bpe512', 'bpe:300'
    with pytest.raises(UserError, match='where prepare_data.py puts shakespeare data with tokenizer bpe:512, not '
                                        'shakespeare with tokenizer bpe:300: pass --data_dir=data/shakespeare-bpe300'):
        data_to_prepare(cfg, distributed=False)
    cfg.data_dir, cfg.dataset = str(tmp_path / 'missing'), 'text'
    with pytest.raises(UserError, match="dataset='text' is prepared from your own text: pass --input=PATH"):
        data_to_prepare(cfg, distributed=False)
    cfg.input, cfg.init_from = str(tmp_path / 'text.txt'), 'resume'
    with pytest.raises(UserError, match='init_from=resume reads out_dir/ckpt.pt, and there is no o/ckpt.pt'):
        data_to_prepare(cfg, distributed=False)
    cfg.init_from = 'scratch'
    assert data_to_prepare(cfg, distributed=False).startswith(f'note: data_dir {tmp_path / "missing"} is missing')
    # a prepared data_dir of other data than the config names is used as it is, with a note
    from nanoponder.data import read_meta
    from nanoponder.prerun import other_data_notes
    meta = read_meta(str(tmp_path / 'data'))
    cfg.data_dir = str(tmp_path / 'data')
    for dataset, tokenizer, notes in (('shakespeare', 'bpe:512', 0), ('shakespeare', 'gpt2', 1), ('text', 'bpe:512', 1),
                                      ('shakespeare', str(tmp_path / 'data' / 'tokenizer.json'), 0),
                                      ('shakespeare', str(tmp_path / 'export' / 'tokenizer.json'), 1)):
        cfg.dataset, cfg.tokenizer = dataset, tokenizer
        assert len(other_data_notes(cfg, meta)) == notes, (dataset, tokenizer)
    cfg.dataset, cfg.tokenizer = 'text', 'bpe:512'
    assert "holds shakespeare data with tokenizer bpe:512, not the config's text with bpe:512: it is used as it is" in \
        other_data_notes(cfg, meta)[0]
