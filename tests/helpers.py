"""What the test files share (`from helpers import ...`; pytest puts tests/ on the import path): the repository
and the environment of the scripts they run, tiny models of every method, a tiny train.py run on token files
made here, and the checks of a refused command (one `error:` line, the files that were there unchanged).
Fixtures (tokenizers trained in the test) are in conftest.py."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from nanoponder.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]  # the repository: the scripts run from here
# one thread: ops this small gain nothing from two, and when other jobs share the cores every op of a two-thread
# process waits for its descheduled partner (8 ms per op instead of 0.1 ms here); offline: a hub id or a hub
# dataset fails at once, never reaches the network
# the measured matmul peak (MFU on a CPU) is cached here, not in the user's ~/.cache: measured once per test session
os.environ['XDG_CACHE_HOME'] = os.path.join(tempfile.gettempdir(), 'nanoponder-tests-cache')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}

# -----------------------------------------------------------------------------
# tiny models, in the test's process

TINY_MODEL = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
METHODS = {'vanilla': {}, 'ponderlm2-k1': {'n_thoughts': 1}, 'ponderlm2-k2': {'n_thoughts': 2},
           'ponderlm1-n2': {'n_ponder': 2}}


def tiny(method='vanilla', **config):
    """A tiny random model (seed 0) in eval mode: TINY_MODEL's shape with the settings of METHODS[method], the
    keys of config overriding either."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY_MODEL, **METHODS[method], **config})).eval()


def randomize(model, std=0.3, seed=1):
    """The init's small weights give near-uniform logits; larger ones make differences and greedy choices show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def randomize_matrices(model, std=0.3, seed=1):
    """randomize, then biases 0 and LayerNorm gains 1: random biases and shifts add one vector at every position,
    which makes greedy decoding repeat one token forever (a weak comparison). Random matrices only."""
    randomize(model, std, seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith('bias'):
                p.zero_()
            elif 'norm' in key:
                p.fill_(1.0)
    return model


def write_checkpoint(path, model, data_dir):
    """model as the checkpoint of a train.py run at iteration 0 on the data in data_dir."""
    Checkpoint(model_args=vars(model.config), model=model.state_dict(), optimizer={}, scaler={}, iter_num=0,
               data_state={}, rng={}, best_val_loss=0.0, config={'data_dir': str(data_dir)}).save(str(path))


# -----------------------------------------------------------------------------
# a tiny train.py run (2 layers, 32 wide, vocab 128, blocks of 16 tokens) on token files made here

VOCAB = 128
TINY = ['--model=', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', f'--vocab_size={VOCAB}',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--learning_rate=1e-2', '--n_thoughts=1', '--jacobi_train_range=(1,3)', '--n_jacobi=2',
        '--device=cpu', '--dtype=float32', '--compile=False']


def make_data(data_dir, tokens_train=2000, tokens_val=400, pattern=False, seed=0):
    """train.bin/val.bin of uint16 ids < VOCAB and a meta.json, as prepare_data.py writes them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (('train', tokens_train), ('val', tokens_val)):
        if pattern:  # a cycle of 28 tokens: every next token is predictable from the current one
            ids = np.tile(np.arange(1, 29), n // 28 + 1)[:n]
        else:
            ids = rng.integers(0, VOCAB, n)
        ids.astype(np.uint16).tofile(data_dir / f'{name}.bin')
    meta = {'dataset': 'test', 'tokenizer': 'test', 'vocab_size': VOCAB, 'eos_id': 0, 'dtype': 'uint16'}
    (data_dir / 'meta.json').write_text(json.dumps(meta))
    return data_dir


def run_train(tmp_path, *args, nproc=0, data_dir=None, out='out', timeout=180, check=True):
    """Run train.py (under torch.distributed.run with nproc processes if nproc) with the tiny model."""
    data_dir = data_dir or tmp_path / 'data'
    if not data_dir.exists():
        make_data(data_dir)
    launcher = [sys.executable]
    if nproc:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + ['train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / out}', *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def metrics(out_dir):
    """The (iteration, loss) and (iteration, val_loss) pairs of out_dir/metrics.jsonl."""
    with open(out_dir / 'metrics.jsonl') as f:
        entries = [json.loads(line) for line in f]
    train = [(e['iter'], e['loss']) for e in entries if 'loss' in e]
    val = [(e['iter'], e['val_loss']) for e in entries if 'val_loss' in e]
    return train, val


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# -----------------------------------------------------------------------------
# a refused command: one `error:` line, and the files that were there unchanged

def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ''


def assert_one_error(r, code, *needles):
    """r (a finished subprocess) exited with code, no traceback, exactly one `error:` line, the last of stderr,
    holding every needle."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and last_line(r.stderr) == errors[0], r.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(*dirs):
    """{path relative to dirs[0]: sha256} of every file under dirs: what must not change."""
    return {os.path.relpath(os.path.join(d, f), dirs[0]): digest(os.path.join(d, f))
            for top in dirs for d, _, files in os.walk(top) for f in files}
