"""The lens (model.pass_states, nanoponder/lens.py): every pass of every method read through the head, against slow
references written from each method's definition; its statistics on hand-made readouts; eval.py --lens=True and
sample.py --lens=True from the command line.

    python -m pytest tests/test_lens.py -q
"""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from model import GPTConfig, pass_states
from nanoponder.lens import LensTotals, frequency_buckets, pass_names, token_counts
from helpers import ENV, ROOT, TINY_MODEL, assert_one_error, randomize_matrices, tiny, write_checkpoint
from test_methods import PAUSE_ID, stack
from test_thoughts import sequential_thought_slots

METHODS = {'vanilla': {}, 'ponderlm2-k1': dict(n_thoughts=1), 'ponderlm2-k2': dict(n_thoughts=2),
           'ponderlm1-n2': dict(n_ponder=2), 'hidden-n2': dict(n_hidden=2), 'loop-k2': dict(n_loop=2),
           'pause-k2': dict(n_pause=2, pause_token_id=PAUSE_ID)}


def model_of(name):
    return randomize_matrices(tiny('vanilla', **METHODS[name]))


def ids(T=7, seed=0):
    return torch.randint(0, PAUSE_ID, (2, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the readouts against each method's definition

def loop_runs_reference(model, idx):
    """Loop's readout after run j: the layer stack j+1 times from the embeddings, then the final LayerNorm."""
    pos = list(range(idx.size(1)))
    runs = []
    for j in range(model.config.n_loop + 1):
        h = model.embed_in(idx) * math.sqrt(2.5 * model.config.n_embd)
        for _ in range(j + 1):
            h = stack(model, h, pos)
        runs.append(model.final_layer_norm(h))
    return torch.stack(runs, dim=2)


def pause_slots_reference(model, idx):
    """Pause's slots from the interleaved sequence x1 P..P x2 P..P (each at its token's position), one pass."""
    cfg = model.config
    B, T = idx.size()
    ids_, pos = [], []
    for t in range(T):
        ids_ += [idx[:, t]] + [torch.full((B,), cfg.pause_token_id)] * cfg.n_pause
        pos += [t] * (cfg.n_pause + 1)
    x = model.embed_in(torch.stack(ids_, dim=1)) * math.sqrt(cfg.n_embd)
    return model.final_layer_norm(stack(model, x, pos)).view(B, T, cfg.n_pause + 1, -1)


def feedback_steps_reference(model, idx):
    """PonderLM and Hidden: the trunk's output after each of the N+1 steps, each step adding to the input the
    expected next-token embedding (PonderLM) or the output itself (Hidden)."""
    cfg = model.config
    pos = list(range(idx.size(1)))
    s = cfg.embed_scale
    f = lambda c: model.final_layer_norm(stack(model, c, pos))  # noqa: E731
    c, steps = model.embed_in(idx) * s, []
    for _ in range(max(cfg.n_ponder, cfg.n_hidden) + 1):
        h = f(c)
        steps.append(h)
        c = c + (h if cfg.n_hidden else torch.softmax(model.embed_out(h), dim=-1) @ model.embed_in.weight * s)
    return torch.stack(steps, dim=2)


REFERENCES = {'ponderlm2': sequential_thought_slots, 'loop': loop_runs_reference, 'pause': pause_slots_reference,
              'ponderlm1': feedback_steps_reference, 'hidden': feedback_steps_reference}


@pytest.mark.parametrize('name', METHODS)
def test_the_last_readout_is_the_models_logits_and_every_readout_its_definitions(name):
    model, idx = model_of(name), ids()
    cfg = model.config
    with torch.no_grad():
        states = pass_states(model, idx)  # exact thoughts
        P = max(cfg.passes, cfg.slots)
        assert states.shape == (2, 7, P, cfg.n_embd) and len(pass_names(cfg)) == P
        logits = model.sequential_logits(idx) if cfg.n_thoughts else model(idx)[0]
        assert torch.equal(model.embed_out(states[:, :, -1]), logits)  # bit for bit: the same computation
        if cfg.n_thoughts:  # Jacobi readouts: the last is the forward's; at K(T-1) passes all are the exact ones
            R = model.exact_passes(idx.size(1))
            assert torch.equal(model.embed_out(pass_states(model, idx, n_jacobi=1)[:, :, -1]), model(idx, n_jacobi=1)[0])
            torch.testing.assert_close(pass_states(model, idx, n_jacobi=R), states, atol=1e-5, rtol=1e-5)
            assert (pass_states(model, idx, n_jacobi=1) - states).abs().max() > 1e-3  # the test can tell
        if name != 'vanilla':
            ref = REFERENCES[cfg.method.split('-')[0]](model, idx)
            torch.testing.assert_close(states, ref, atol=1e-5, rtol=1e-5)
            assert (states[:, :, 0] - states[:, :, -1]).abs().max() > 1e-2  # the passes differ


def test_the_token_slots_readout_is_the_first_thought_of_the_sequential_path():
    """PonderLM-2's first readout is the token slot's output: the first thought that model.sequential feeds
    back, as decoding computes it."""
    model, idx = model_of('ponderlm2-k2'), ids()
    with torch.no_grad():
        h, thoughts = model.sequential(idx, model.new_caches(2, 7, 'cpu'))  # (B, T, C), (B, T, K, C)
        states = pass_states(model, idx)
    assert torch.equal(states[:, :, 0], thoughts[:, :, 0]) and torch.equal(states[:, :, 1], thoughts[:, :, 1])


# -----------------------------------------------------------------------------
# the statistics, on readouts made by hand

def test_fixed_broken_nll_and_kl_on_a_hand_made_case():
    """Four tokens, two passes, a head that reads logits straight off the state (identity): the first pass right
    on tokens 0 and 1, the last right on 0 and 2. Token 2 is fixed, token 1 broken."""
    V = 3
    head = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    y = torch.tensor([[0, 1, 2, 0]])
    first = torch.tensor([[4., 0, 0], [0, 4, 0], [4, 0, 0], [0, 0, 4]])  # top-1: 0, 1, 0, 2
    last = torch.tensor([[4., 0, 0], [0, 0, 4], [0, 0, 4], [0, 4, 0]])  # top-1: 0, 2, 2, 1
    states = torch.stack((first, last), dim=1)[None]  # (1, 4, 2, V)
    config = GPTConfig(**{**TINY_MODEL, 'n_thoughts': 1})
    totals = LensTotals(config, np.array([0, 1, 1]), ['top', 'rest'])
    totals.add(head, states, y)
    report = totals.report('exact thoughts', 'by hand')
    logp = lambda s: torch.log_softmax(s, dim=-1)  # noqa: E731
    nll = [-logp(s)[range(4), y[0]] for s in (first, last)]
    kl = [(logp(last).exp() * (logp(last) - logp(s))).sum(-1) for s in (first, last)]
    for p in range(2):
        assert report['passes'][p]['nll'] == pytest.approx(nll[p].mean().item(), rel=1e-6)
        assert report['passes'][p]['kl_from_final'] == pytest.approx(kl[p].mean().item(), rel=1e-6, abs=1e-9)
    assert [p['top1'] for p in report['passes']] == [0.5, 0.5]
    assert report['fixed'] == dict(tokens=1, share=0.25, of_first_errors=0.5)
    assert report['broken'] == dict(tokens=1, share=0.25, of_first_correct=0.5)
    gains = (nll[0] - nll[1]).numpy()
    assert report['gain_quantiles']['50%'] == pytest.approx(float(np.median(gains)), rel=1e-6)
    top, rest = report['by_frequency']
    assert (top['bucket'], top['tokens'], rest['tokens']) == ('top', 2, 2)  # targets 0, 0 and 1, 2
    assert top['mean_gain'] == pytest.approx(float(gains[[0, 3]].mean()), rel=1e-6)
    assert report['example']['targets'] == [0, 1, 2, 0] and report['example']['top'] == [[0, 1, 0, 2], [0, 2, 2, 1]]
    assert report['passes'][1]['kl_from_final'] == 0


def test_frequency_buckets_rank_decades_and_the_unseen():
    counts = token_counts(np.array([5] * 30 + list(range(20)) + [3] * 10), 120)  # id 5 first, 3 second, ...
    bucket, labels = frequency_buckets(counts)
    assert labels == ['ranks 1-10', 'ranks 11-20', 'never seen']  # 20 ids seen: the last decade ends at 20
    assert bucket[5] == bucket[3] == 0 and (bucket[counts == 0] == 2).all() and (counts[bucket == 2] == 0).all()
    assert sorted(np.bincount(bucket[counts > 0])) == [10, 10]  # the 20 seen ids: 10 in each of the first decades
    bucket, labels = frequency_buckets(np.arange(512, 0, -1))  # every id seen
    assert labels == ['ranks 1-10', 'ranks 11-100', 'ranks 101-512'] and list(np.bincount(bucket)) == [10, 90, 412]


# -----------------------------------------------------------------------------
# eval.py --lens=True and sample.py --lens=True

@pytest.fixture(scope='module')
def lens_run(tmp_path_factory, tiny_tokenizer):
    """A tiny PonderLM-2 K=1 and a vanilla checkpoint beside the data they name."""
    from prepare_data import prepare
    root = tmp_path_factory.mktemp('lens')
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran']
    rng = random.Random(0)
    (root / 'corpus.txt').write_text(''.join(' '.join(rng.choice(words) for _ in range(10)) + '\n'
                                             for _ in range(60)), encoding='utf-8')
    prepare('text', input=str(root / 'corpus.txt'), tokenizer=tiny_tokenizer(words), out_dir=str(root / 'data'),
            num_proc=1)
    for name, config in (('k1', dict(n_thoughts=1)), ('vanilla', {})):
        model = randomize_matrices(tiny('vanilla', vocab_size=300, block_size=16, **config), std=0.2)
        (root / name).mkdir()
        write_checkpoint(root / name / 'ckpt.pt', model, root / 'data')
    return root


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_eval_lens_writes_its_table_keys_and_picture(lens_run):
    r = run('eval.py', f'--init_from={lens_run / "k1" / "ckpt.pt"}', '--lens=True', '--max_windows=3',
            '--max_jacobi=1', '--jacobi_tols=()', '--exact=False', '--split=test')
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((lens_run / 'k1' / 'eval_test.json').read_text())
    lens = report['lens']
    assert lens['thoughts'] == 'exact thoughts' and lens['tokens'] == report['tokens'] > 16
    assert [p['name'] for p in lens['passes']] == ['token', 'thought 1']
    exact = {row['name']: row['loss'] for row in report['rows']}['exact']  # the lens's exact states, scored
    assert lens['passes'][-1]['nll'] == pytest.approx(exact, rel=1e-6)
    assert lens['passes'][-1]['kl_from_final'] == 0 and 'train.bin' in lens['frequency_source']
    assert sum(b['tokens'] for b in lens['by_frequency']) == lens['tokens']
    assert '| thought 1 |' in r.stdout and 'fixed (wrong top-1 at the first pass' in r.stdout
    assert (lens_run / 'k1' / 'eval_test_lens.png').stat().st_size > 1000
    r = run('eval.py', f'--init_from={lens_run / "k1" / "ckpt.pt"}', '--lens=True', '--max_windows=2',
            '--max_jacobi=0', '--jacobi_tols=()', '--thoughts=jacobi', '--n_jacobi=2', f'--out={lens_run / "j"}')
    assert r.returncode == 0 and 'note:' not in r.stderr, r.stderr[-2000:]
    assert json.loads((lens_run / 'j.json').read_text())['lens']['thoughts'] == 'Jacobi thoughts, R=2'
    # sliding windows: the context tokens of a window are not scored, by the loss or by the lens
    r = run('eval.py', f'--init_from={lens_run / "k1" / "ckpt.pt"}', '--lens=True', '--stride=6', '--max_windows=3',
            '--max_jacobi=0', '--jacobi_tols=()', f'--out={lens_run / "strided"}')
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((lens_run / 'strided.json').read_text())
    assert report['tokens'] == report['lens']['tokens'] == 16 + 2 * 6  # the first window's 16, then 6 each
    exact = {row['name']: row['loss'] for row in report['rows']}['exact']
    assert report['lens']['passes'][-1]['nll'] == pytest.approx(exact, rel=1e-6)


def test_eval_lens_on_vanilla_is_one_pass_and_a_note(lens_run):
    r = run('eval.py', f'--init_from={lens_run / "vanilla" / "ckpt.pt"}', '--lens=True', '--max_windows=2')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'note: a vanilla model reads each token once: the lens has one pass' in r.stderr
    lens = json.loads((lens_run / 'vanilla' / 'eval.json').read_text())['lens']
    assert len(lens['passes']) == 1 and lens['fixed']['tokens'] == lens['broken']['tokens'] == 0
    assert '| token |' in r.stdout
    # a text file: the frequency ranks come from the model's training data when it is known, else from the text
    (lens_run / 'text.txt').write_text('the cat sat on a mat and the dog ran\n' * 3, encoding='utf-8')
    hf = lens_run / 'k1' / 'no-data.pt'
    ckpt = torch.load(lens_run / 'k1' / 'ckpt.pt', weights_only=False)
    ckpt['config'] = {}  # a checkpoint that does not record its data
    torch.save(ckpt, hf)
    r = run('eval.py', f'--init_from={hf}', '--lens=True', f'--text={lens_run / "text.txt"}',
            f'--tokenizer={lens_run / "data" / "tokenizer.json"}', '--max_jacobi=0', '--jacobi_tols=()',
            f'--out={lens_run / "text"}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((lens_run / 'text.json').read_text())['lens']['frequency_source'] == \
        'ranked by their counts in the scored text'


@pytest.mark.parametrize('args, needles', [
    (['--lens=maybe'], ['--lens=maybe', 'lens must be']),
    (['--lens=True', '--tasks=piqa'], ['--lens and a sweep of --think_thresholds read a text', 'drop --tasks'])])
def test_bad_lens_options_are_one_error_line(lens_run, args, needles):
    r = run('eval.py', f'--init_from={lens_run / "k1" / "ckpt.pt"}', f'--out={lens_run / "bad"}', *args)
    assert_one_error(r, 2, *needles)
    assert not list(lens_run.glob('bad*'))


def test_sample_lens_is_a_line_per_new_token_on_stderr_and_leaves_stdout_alone(lens_run):
    args = [f'--init_from={lens_run / "k1" / "ckpt.pt"}', '--max_new_tokens=6', '--start=the cat', '--temperature=0',
            '--dtype=float32']
    plain, lensed = run('sample.py', *args), run('sample.py', *args, '--lens=True')
    assert plain.returncode == lensed.returncode == 0, lensed.stderr[-2000:]
    assert lensed.stdout == plain.stdout
    lines = lensed.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith('lens: token'))
    rows = lines[head + 1:head + 7]
    assert [row.split()[0] for row in rows] == ['1', '2', '3', '4', '5', '6'] and '| chosen' in lines[head]
    # greedy: the last pass's top-1 is the token chosen
    assert all(row.split('|')[1].split()[0] == row.split('|')[2].strip() for row in rows), rows
    bad = run('sample.py', *args, '--lens=1')
    assert_one_error(bad, 2, 'lens must be')
