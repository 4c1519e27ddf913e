"""
train.py end to end on the CPU with a tiny model (2 layers, 32 wide, vocab 128, blocks of 16 tokens) and
token files made here: the loss falls, a resumed run repeats an uninterrupted one bit for bit, two DDP or FSDP
processes equal one process with the same global batch, a checkpoint resumes under another parallelism and
number of processes, checkpoints are written atomically, and user mistakes end in one `error:` line.

    python -m pytest tests/test_train.py -q
"""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from model import GPTConfig
from nanoponder.checkpoint import Checkpoint
from nanoponder.methods import method_fields
from helpers import ENV, ROOT, TINY, VOCAB, digest, last_line, load_ckpt, make_data, metrics, run_train


def run_trains(tmp_path, *runs):
    """run_train(tmp_path, *args, **kwargs) for each (args, kwargs) in runs, all at the same time: most of a tiny
    run is starting Python and torch, which the processes overlap."""
    make_data(tmp_path / 'data')
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run_train, tmp_path, *args, timeout=300, **kwargs) for args, kwargs in runs]
        return [f.result() for f in futures]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A short run on learnable data, shared by the tests that need a finished run and its checkpoint."""
    tmp = tmp_path_factory.mktemp('trained')
    make_data(tmp / 'data', pattern=True)
    r = run_train(tmp, '--max_iters=30', '--eval_interval=10')
    return tmp, r


def test_loss_falls_and_outputs(trained):
    tmp, r = trained
    out = tmp / 'out'
    for what in ('non-embedding params', 'tokens per iteration', '30 iterations', 'FLOPs/token'):
        assert what in r.stdout
    train, val = metrics(out)
    assert [i for i, _ in train] == list(range(1, 31))
    assert [i for i, _ in val] == [0, 10, 20, 30]
    assert val[-1][1] < val[0][1] - 1.5, val  # from ~ln(128) = 4.85 towards 0 on the cycle
    assert train[-1][1] < train[0][1] - 1.5, train
    assert (out / 'loss.png').stat().st_size > 0
    ckpt = load_ckpt(out / 'ckpt.pt')  # weights_only: nothing but tensors and plain values inside
    assert set(ckpt) >= {'model_args', 'model', 'optimizer', 'iter_num', 'data_state', 'rng', 'best_val_loss', 'config'}
    assert ckpt['iter_num'] == 30 and ckpt['model_args']['n_layer'] == 2 and ckpt['model_args']['n_thoughts'] == 1
    assert ckpt['config']['data_dir'] == str(tmp / 'data') and ckpt['best_val_loss'] == min(v for _, v in val)
    assert set(ckpt['data_state']) == {'epoch', 'position'}
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    best = load_ckpt(out / 'best.pt')
    assert best['best_val_loss'] == ckpt['best_val_loss']
    assert not [p for p in os.listdir(out) if '.tmp' in p]


# 30 blocks of train data = 3 iterations of 8 blocks per epoch: the run crosses epochs, the resume is mid-epoch.
# The schedule is pinned (warmup, lr_decay_iters) so the first half's run has the full run's learning rates.
RESUME_COMMON = ['--eval_interval=4', '--lr_decay_iters=10', '--warmup_iters=2']


@pytest.fixture(scope='module')
def full_and_half(tmp_path_factory):
    """A run of 10 iterations ('full') and the same run stopped at 4 ('half'), for the resume tests to go on with."""
    tmp = tmp_path_factory.mktemp('resume')
    make_data(tmp / 'data', tokens_train=30 * 16 + 1)
    run_train(tmp, '--max_iters=10', *RESUME_COMMON, out='full')
    run_train(tmp, '--max_iters=4', *RESUME_COMMON, out='half')
    return tmp


def resume_half(runs, out, rewrite=None):
    """A copy of the half run at out (its checkpoint's dict passed through rewrite, if given), resumed to 10."""
    import shutil
    shutil.copytree(runs / 'half', out)
    if rewrite:
        ckpt = load_ckpt(out / 'ckpt.pt')
        rewrite(ckpt)
        torch.save(ckpt, out / 'ckpt.pt')
    return run_train(out.parent, '--max_iters=10', '--init_from=resume', *RESUME_COMMON, data_dir=runs / 'data',
                     out=out.name)


def assert_goes_on_as_full(runs, out):
    full_train, full_val = metrics(runs / 'full')
    half_train, half_val = metrics(out)
    assert [i for i, _ in full_train] == list(range(1, 11))
    assert half_train == full_train  # bit-identical losses, each iteration logged once
    assert half_val == full_val and [i for i, _ in full_val] == [0, 4, 8, 10]
    a, b = load_ckpt(runs / 'full' / 'ckpt.pt'), load_ckpt(out / 'ckpt.pt')
    assert a['data_state'] == b['data_state'] and a['data_state']['epoch'] == 3
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_resume_is_exact(full_and_half, tmp_path):
    r = resume_half(full_and_half, tmp_path / 'half')
    assert 'resuming at 4' in r.stdout
    assert_goes_on_as_full(full_and_half, tmp_path / 'half')


def test_a_checkpoint_of_format_2_resumes_exactly(full_and_half, tmp_path):
    """Format 2 (the main before jacobi_train_range left GPTConfig) kept it in model_args too: it still resumes,
    and goes on as the uninterrupted run."""
    def as_format_2(ckpt):
        assert ckpt['format'] == 3 and 'jacobi_train_range' not in ckpt['model_args']
        ckpt['format'] = 2
        ckpt['model_args']['jacobi_train_range'] = tuple(ckpt['config']['jacobi_train_range'])  # (1, 3): TINY's

    r = resume_half(full_and_half, tmp_path / 'old', rewrite=as_format_2)
    assert 'resuming at 4' in r.stdout and 'not an exact resume' not in r.stdout
    assert_goes_on_as_full(full_and_half, tmp_path / 'old')
    resaved = load_ckpt(tmp_path / 'old' / 'ckpt.pt')
    assert resaved['format'] == 3 and 'jacobi_train_range' not in resaved['model_args']
    assert resaved['config']['jacobi_train_range'] == (1, 3)


def test_ddp_matches_one_process(tmp_path):
    # the same global batch (2 sequences x 2 micro-batches) as 1 process x 2 accumulation steps
    # and as 2 processes x 1; the Jacobi draws R and the thought-dropout patterns must agree across the ranks too
    args = ['--max_iters=3', '--eval_interval=3', '--batch_size=2', '--gradient_accumulation_steps=2',
            '--thought_dropout=0.3']
    run_train(tmp_path, *args, out='one')
    r = run_train(tmp_path, *args, nproc=2, out='two')
    assert 'FutureWarning' not in r.stderr, r.stderr[-2000:]  # (DDP's deprecated broadcast_buffers, on every rank)
    a, b = load_ckpt(tmp_path / 'one' / 'ckpt.pt'), load_ckpt(tmp_path / 'two' / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 3 and a['data_state'] == b['data_state']
    for k in a['model']:
        x, y = a['model'][k], b['model'][k]
        if k.endswith('query_key_value.bias'):
            # the key bias adds q.b_k to every score of a query alike, which softmax ignores: its true gradient
            # is 0, so the gradients are rounding noise that Adam scales up to lr-sized steps; compare q and v only
            x, y = x.view(2, 3, 16)[:, [0, 2]], y.view(2, 3, 16)[:, [0, 2]]  # (head, q/k/v, head_size)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=k)
    (one_train, _), (two_train, _) = metrics(tmp_path / 'one'), metrics(tmp_path / 'two')
    assert [i for i, _ in one_train] == [i for i, _ in two_train] == [1, 2, 3]
    for (_, x), (_, y) in zip(one_train, two_train):
        assert abs(x - y) < 1e-5  # the logged loss is the mean over all ranks


# the same global batch of 8 sequences: 1 process x 4 micro-batches, or 2 x 2 (gradient accumulation under both)
FSDP_COMMON = ['--batch_size=2', '--gradient_accumulation_steps=4', '--eval_interval=3', '--warmup_iters=2',
               '--lr_decay_iters=6']
FSDP = ['--parallelism=fsdp']


def assert_same_weights(a, b, atol=1e-5):
    """Two state dicts within atol, but for the key bias (see test_ddp_matches_one_process: its gradient is
    rounding noise, compared through q and v only)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith('query_key_value.bias'):
            x, y = x.view(2, 3, 16)[:, [0, 2]], y.view(2, 3, 16)[:, [0, 2]]
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=k)


def assert_same_losses(a, b, atol=1e-5):
    assert [i for i, _ in a] == [i for i, _ in b]  # each iteration logged once, none missing
    for (i, x), (_, y) in zip(a, b):
        assert abs(x - y) < atol, (i, x, y)


def assert_same_optimizer_layout(a, b):
    """torch.optim's layout for the unwrapped model: parameter indices, the same groups and settings."""
    assert a['param_groups'] == b['param_groups']
    assert sorted(a['state']) == sorted(b['state']) == list(range(len(a['state'])))
    for i in a['state']:
        assert {k: v.shape for k, v in a['state'][i].items()} == {k: v.shape for k, v in b['state'][i].items()}
        assert torch.equal(a['state'][i]['step'], b['state'][i]['step'])


def test_fsdp_matches_one_process_vanilla(tmp_path):
    args = [*FSDP_COMMON, '--n_thoughts=0', '--max_iters=3']
    run_trains(tmp_path, (args, {'out': 'one'}), (args + FSDP, {'nproc': 2, 'out': 'fsdp'}))
    a, b = load_ckpt(tmp_path / 'one' / 'ckpt.pt'), load_ckpt(tmp_path / 'fsdp' / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 3 and a['data_state'] == b['data_state']
    assert_same_weights(a['model'], b['model'])
    assert_same_optimizer_layout(a['optimizer'], b['optimizer'])
    assert_same_losses(metrics(tmp_path / 'one')[0], metrics(tmp_path / 'fsdp')[0])
    assert b['config']['parallelism'] == 'fsdp'


def test_fsdp_checkpoints_resume_in_one_process_and_back(tmp_path):
    """PonderLM-2 K=1. A run of 6 iterations, the same run stopped at 3 by 1 process and resumed by 2 under fsdp,
    and stopped at 3 under fsdp (with activation checkpointing) and resumed by 1 process: the checkpoint at 3
    holds the same state either way (FSDP's gathered to rank 0, keyed as torch.optim keys it), and both resumed
    runs go on along the uninterrupted run's losses. Equal within 1e-5, not bit for bit: 2 processes add the
    gradients in another order (the same parallelism resumes bit for bit: test_resume_is_exact)."""
    one_proc, fsdp = ([*FSDP_COMMON, '--max_iters=3'], {'out': 'one'}), \
        ([*FSDP_COMMON, '--max_iters=3', *FSDP, '--activation_checkpointing=True'], {'nproc': 2, 'out': 'fsdp'})
    run_trains(tmp_path, ([*FSDP_COMMON, '--max_iters=6'], {'out': 'full'}), one_proc, fsdp)
    a, b = load_ckpt(tmp_path / 'one' / 'ckpt.pt'), load_ckpt(tmp_path / 'fsdp' / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 3 and a['data_state'] == b['data_state']
    assert_same_weights(a['model'], b['model'])  # 2 processes under fsdp train as 1 process does
    assert_same_optimizer_layout(a['optimizer'], b['optimizer'])
    resume = ['--max_iters=6', '--init_from=resume']
    run_trains(tmp_path, ([*FSDP_COMMON, *resume, *FSDP], {'nproc': 2, 'out': 'one'}),  # 1 process -> fsdp
               ([*FSDP_COMMON, *resume], {'out': 'fsdp'}))  # fsdp -> 1 process
    full = load_ckpt(tmp_path / 'full' / 'ckpt.pt')
    full_train, full_val = metrics(tmp_path / 'full')
    assert [i for i, _ in full_train] == list(range(1, 7)) and [i for i, _ in full_val] == [0, 3, 6]
    for out in ('one', 'fsdp'):
        ckpt = load_ckpt(tmp_path / out / 'ckpt.pt')
        assert ckpt['iter_num'] == 6 and ckpt['data_state'] == full['data_state']
        assert_same_weights(ckpt['model'], full['model'])
        assert_same_losses(metrics(tmp_path / out)[0], full_train)


# -----------------------------------------------------------------------------
# the papers' baselines (Pause, Loop, hidden-state feedback): exact resume, and DDP and FSDP equal one process.
# K=2 / N=2, the general case (the last of several pauses predicts; more than one extra pass). Pause needs a row
# that no token of the data is: the vocabulary padded by 8, the last row.
BASELINES = {'pause-k2': ['--vocab_size=136', '--pause_token_id=135'], 'loop-k2': [], 'hidden-n2': []}
# the same global batch of 8 sequences: 1 process x 4 micro-batches, or 2 x 2; the schedule pinned, so that the run
# stopped at 2 has the learning rates of the run to 4. lr 1e-3: Adam turns the rounding noise of a near-zero
# gradient into a step of up to lr (at 1e-2 one weight of pause-k2 ended 2e-5 apart under DDP); a gradient that is
# not synced still moves the weights ~lr apart
BASELINE_COMMON = ['--batch_size=2', '--gradient_accumulation_steps=4', '--eval_interval=2', '--warmup_iters=1',
                   '--lr_decay_iters=4', '--learning_rate=1e-3']

# train.py once per (processes, arguments) of the list in argv[1] (json), all in this one interpreter: torch and
# every module are imported once, not per run (3 s of a tiny run's 4). A run of N > 1 processes is N forks of it,
# each given torchrun's environment (torchrun's workers cannot start a second process group: its store keeps the
# first one's keys). Stops at a failed run.
SEVERAL_RUNS = r'''
import json, os, runpy, socket, sys
import matplotlib
matplotlib.use('Agg')
# what train.py imports, and what it imports only when it runs (the forks would each import it again)
import matplotlib.pyplot, numpy.random, torch._dynamo, torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.distributed.fsdp, train  # noqa: F401


def run(args, env={}):
    os.environ.update(env)
    sys.argv = ['train.py', *args]
    try:
        runpy.run_path('train.py', run_name='__main__')
    except SystemExit as e:
        return e.code or 0
    return 0


for nproc, args in json.loads(sys.argv[1]):
    if nproc == 1:
        code = run(args)
    else:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                code = run(args, {'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(nproc),
                                  'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)})
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
            pids.append(pid)
        codes = []
        while pids:  # a rank that fails ends the others (as torchrun does), or they would wait for it forever
            pid, status = os.wait()
            pids.remove(pid)
            codes.append(abs(os.waitstatus_to_exitcode(status)))
            if codes[-1]:
                for other in pids:
                    os.kill(other, 9)
        code = max(codes)
    if code:
        sys.exit(code)
'''


def train_several(tmp_path, runs):
    """Each (out, processes, args) of runs: train.py with the tiny model on tmp_path/data into tmp_path/out, one
    run after the other in one interpreter (SEVERAL_RUNS)."""
    argvs = [(nproc, [*TINY, f"--data_dir={tmp_path / 'data'}", f'--out_dir={tmp_path / out}', *args])
             for out, nproc, args in runs]
    r = subprocess.run([sys.executable, '-c', SEVERAL_RUNS, json.dumps(argvs)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope='module')
def baseline_runs(tmp_path_factory):
    """For each baseline: a run of 4 iterations ('full'), one stopped at 2 and resumed to 4 ('half'), and the full
    run under DDP and under FSDP with 2 processes."""
    tmp = tmp_path_factory.mktemp('baselines')
    make_data(tmp / 'data')
    runs = []
    for method, extra in BASELINES.items():
        args = [f'--{key}={value}' for key, value in method_fields(method).items()] + extra + BASELINE_COMMON
        runs += [(f'{method}-{p}', 2, args + ['--max_iters=4', f'--parallelism={p}']) for p in ('ddp', 'fsdp')]
        runs += [(f'{method}-half', 1, args + ['--max_iters=2']), (f'{method}-full', 1, args + ['--max_iters=4']),
                 (f'{method}-half', 1, args + ['--max_iters=4', '--init_from=resume'])]
    train_several(tmp, runs)
    return tmp


@pytest.mark.parametrize('method', list(BASELINES))
def test_the_baselines_resume_exactly_and_train_alike_under_ddp_and_fsdp(baseline_runs, method):
    full = load_ckpt(baseline_runs / f'{method}-full' / 'ckpt.pt')
    assert GPTConfig(**full['model_args']).method == method and full['iter_num'] == 4
    full_train, full_val = metrics(baseline_runs / f'{method}-full')
    assert [i for i, _ in full_train] == [1, 2, 3, 4] and [i for i, _ in full_val] == [0, 2, 4]
    # stopped at 2 and resumed: bit for bit the uninterrupted run
    resumed = load_ckpt(baseline_runs / f'{method}-half' / 'ckpt.pt')
    assert metrics(baseline_runs / f'{method}-half') == (full_train, full_val)
    assert resumed['data_state'] == full['data_state'] and full['model'].keys() == resumed['model'].keys()
    for k in full['model']:
        assert torch.equal(full['model'][k], resumed['model'][k]), k
    # 2 processes: within 1e-5 (they add the gradients in another order)
    for parallelism in ('ddp', 'fsdp'):
        two = load_ckpt(baseline_runs / f'{method}-{parallelism}' / 'ckpt.pt')
        assert two['config']['parallelism'] == parallelism and two['data_state'] == full['data_state']
        assert_same_weights(two['model'], full['model'])
        assert_same_optimizer_layout(two['optimizer'], full['optimizer'])
        assert_same_losses(metrics(baseline_runs / f'{method}-{parallelism}')[0], full_train)


def checkpoint(iter_num, w):
    return Checkpoint(model_args={}, model={'w': w}, optimizer={}, scaler={}, iter_num=iter_num, data_state={},
                      rng={}, best_val_loss=1.0, config={})


def test_interrupted_checkpoint_save_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint(1, torch.ones(3)).save(path)

    def crashing_save(obj, f):
        f.write(b'half a checkpoint')
        raise RuntimeError('disk full')

    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(RuntimeError, match='disk full'):
        checkpoint(2, torch.zeros(3)).save(path)
    monkeypatch.undo()
    old = load_ckpt(path)
    assert old['iter_num'] == 1 and torch.equal(old['model']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temp file left behind


def assert_one_error_line(r, *needles):
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr
    line = last_line(r.stderr)
    assert line.startswith('error:'), r.stderr[-2000:]
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize('args, needles', [
    (['--data_dir=/nonexistent/data'], ['/nonexistent/data', 'prepare_data.py']),
    (['--bogus_key=1'], ['bogus_key']),
    (['--model=pythia-7b'], ['pythia-7b']),
    (['--batch_size=64'], ['larger than the data']),
    (['--init_from=resume'], ['ckpt.pt', 'init_from=scratch']),
    (['--vocab_size=64'], ['vocab']),
    # Pause's row beyond the model's embedding, which has free rows above the data's 128 ids
    (['--n_thoughts=0', '--n_pause=1', '--vocab_size=130'],
     ['pause_token_id=50288 is no row', 'vocab_size 130', '(128..129)', '--pause_token_id=129']),
])
def test_bad_input_is_one_clear_error(tmp_path, args, needles):
    assert_one_error_line(run_train(tmp_path, '--max_iters=1', *args, check=False), *needles)


def test_resume_with_another_model_is_refused(trained):
    tmp, _ = trained
    out = tmp / 'out'
    before = {name: digest(out / name) for name in ('ckpt.pt', 'metrics.jsonl')}
    r = run_train(tmp, '--max_iters=40', '--init_from=resume', '--n_layer=3', '--n_thoughts=0', check=False)
    assert_one_error_line(r, 'different model', 'n_layer', 'n_thoughts')
    assert before == {name: digest(out / name) for name in before}  # nothing overwritten


def test_divergence_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    tmp, _ = trained
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes((tmp / 'out' / 'ckpt.pt').read_bytes())
    before = digest(out / 'ckpt.pt')
    r = run_train(tmp_path, '--max_iters=40', '--eval_interval=1', '--init_from=resume', '--learning_rate=1e30',
                  data_dir=tmp / 'data', check=False)
    assert_one_error_line(r, 'diverged')
    assert digest(out / 'ckpt.pt') == before
    assert load_ckpt(out / 'ckpt.pt')['iter_num'] == 30


def test_sigterm_saves_and_resumes(tmp_path):
    make_data(tmp_path / 'data')
    cmd = [sys.executable, 'train.py', *TINY, f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}',
           '--max_iters=100000', '--eval_interval=100000', '--always_save_checkpoint=False']
    stdout, stderr = open(tmp_path / 'stdout', 'w+'), open(tmp_path / 'stderr', 'w+')  # files: a pipe could fill
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=stdout, stderr=stderr, text=True)
    log = tmp_path / 'out' / 'metrics.jsonl'
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)  # the first evaluation and two logged iterations
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    stdout.seek(0), stderr.seek(0)
    assert p.returncode == 143, stderr.read()[-2000:]  # 128 + SIGTERM, once the checkpoint is saved
    assert 'stopped by SIGTERM' in stdout.read()
    ckpt = load_ckpt(tmp_path / 'out' / 'ckpt.pt')
    train, _ = metrics(tmp_path / 'out')
    assert ckpt['iter_num'] == train[-1][0] >= 2  # saved at the step boundary after the last logged iteration
    run_train(tmp_path, f"--max_iters={ckpt['iter_num'] + 2}", '--init_from=resume', '--eval_interval=100000')
    train, val = metrics(tmp_path / 'out')
    assert [i for i, _ in train] == list(range(1, ckpt['iter_num'] + 3))
    assert [i for i, _ in val] == [0, ckpt['iter_num'] + 2]


def test_continue_from_a_hugging_face_checkpoint(tmp_path):
    """init_from=<HF dir>: the weights and architecture come from it, the method from the config; resumable."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25)
    hf_model = transformers.GPTNeoXForCausalLM(hf_config)
    hf_model.save_pretrained(tmp_path / 'hf')
    make_data(tmp_path / 'data')
    x = torch.from_numpy(np.fromfile(tmp_path / 'data' / 'val.bin', dtype=np.uint16)[:17].astype(np.int64))[None]
    with torch.no_grad():
        hf_loss = hf_model(x, labels=x).loss.item()  # HF shifts the labels: the same 16 targets as block 0
    # a vanilla continuation, evaluated before any update: the val loss must be the pretrained model's
    args = ['--n_thoughts=0', '--n_layer=5', '--batch_size=1', '--eval_iters=1', '--eval_interval=2']
    run_train(tmp_path, f"--init_from={tmp_path / 'hf'}", '--max_iters=2', *args)
    ckpt = load_ckpt(tmp_path / 'out' / 'ckpt.pt')
    assert ckpt['pretrained'] == str(tmp_path / 'hf') and ckpt['model_args']['n_layer'] == 2  # not the asked 5
    _, val = metrics(tmp_path / 'out')
    assert abs(val[0][1] - hf_loss) < 1e-4, (val, hf_loss)
    run_train(tmp_path, '--init_from=resume', '--max_iters=4', *args)
    assert load_ckpt(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 4


# -----------------------------------------------------------------------------
# the schedule and the batching, in-process: pure functions of their arguments

def test_jacobi_passes_are_a_function_of_seed_and_iteration():
    from train import jacobi_passes
    draws = [jacobi_passes(1337, it, 2, 4) for it in range(200)]
    assert draws == [jacobi_passes(1337, it, 2, 4) for it in range(200)]
    assert set(draws) == {2, 3, 4}
    assert draws != [jacobi_passes(1338, it, 2, 4) for it in range(200)]
    assert {jacobi_passes(1, it, 3, 3) for it in range(20)} == {3}


def test_lr_schedule():
    from train import lr_at
    peak, floor = 1e-3, 1e-4
    lrs = [lr_at(it, peak, floor, 10, 100) for it in range(120)]
    assert lrs[0] == peak / 11 and lrs[9] == peak * 10 / 11  # linear warmup, never 0
    assert lrs[10] == peak and abs(lrs[55] - (peak + floor) / 2) < 1e-12  # cosine: halfway at the middle
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only down
    assert lrs[100:] == [floor] * 20  # flat after the decay


def test_train_batches_split_an_epoch_between_ranks_and_micro_steps(tmp_path):
    from nanoponder.batches import PackedBlocks, TrainBatches
    path = tmp_path / 'train.bin'
    np.arange(50 * 4 + 1, dtype=np.uint16).tofile(path)  # 50 blocks of 4 tokens
    blocks = PackedBlocks(str(path), 4, 'cpu')
    one = TrainBatches(blocks, batch_size=2, accum_steps=4, rank=0, world_size=1, seed=0)
    ranks = [TrainBatches(blocks, batch_size=2, accum_steps=2, rank=r, world_size=2, seed=0) for r in range(2)]
    assert one.iters_per_epoch == 6  # 8 blocks per iteration: 48 used, the last 2 skipped
    epoch, position, seen = 0, 0, []
    for _ in range(6):
        ids = [one.block_ids(epoch, position, m) for m in range(4)]
        # two ranks with two micro-steps each read the same blocks as one process with four
        assert sorted(sum(ids, [])) == sorted(sum((r.block_ids(epoch, position, m) for r in ranks for m in range(2)), []))
        seen += sum(ids, [])
        epoch, position = one.next_iteration(epoch, position)
    assert len(set(seen)) == 48 and (epoch, position) == (1, 0)  # each block at most once per epoch
    x, y = one.get(0, 0, 0)
    assert x.shape == y.shape == (2, 4) and torch.equal(x[:, 1:], y[:, :-1])  # targets: the inputs shifted by one
    assert one.block_ids(1, 0, 0) != one.block_ids(0, 0, 0)  # a new permutation per epoch
