"""experiments/repro.py end to end on a toy budget: it prepares its BPE data from a local text, trains vanilla,
PonderLM-2 K=1, the FLOPs-matched vanilla and Pause K=1 over two seeds, evaluates them with eval.py, writes one
result file per run, its table and plots; a second call reuses the finished runs, and --report=True rebuilds the
table and plots from the result files alone, the run folders gone.

    python -m pytest tests/test_experiments.py -q
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, ROOT, tiny

TOY = ('--model= --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 --batch_size=2 --max_iters=2 --eval_interval=1 '
       '--eval_iters=1 --warmup_iters=1 --dtype=float32')


def test_repro_runs_end_to_end_on_a_toy_budget(tmp_path):
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = ''.join(' '.join(rng.choice(words) for _ in range(12)) + '\n' for _ in range(600))
    (tmp_path / 'input.txt').write_text(text)
    cmd = [sys.executable, str(ROOT / 'experiments' / 'repro.py'), f'--input={tmp_path / "input.txt"}',
           f'--data_dir={tmp_path / "data"}', f'--out_root={tmp_path / "out"}', f'--results_dir={tmp_path / "res"}',
           '--seeds=1,2', '--runs=vanilla,ponderlm2-k1,vanilla-flops,pause-k1', f'--train_args={TOY}']
    names = ('vanilla', 'ponderlm2-k1', 'vanilla-flops', 'pause-k1')
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)  # not from ROOT
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / 'data' / 'meta.json').read_text())['tokenizer'] == 'bpe:512'
    files = sorted(p.name for p in (tmp_path / 'res').glob('*.json'))
    assert files == sorted(f'{n}-s{s}.json' for n in names for s in (1, 2))
    by = {(n, s): json.loads((tmp_path / 'res' / f'{n}-s{s}.json').read_text()) for n in names for s in (1, 2)}
    k1, van, flops, pause = by['ponderlm2-k1', 1], by['vanilla', 1], by['vanilla-flops', 1], by['pause-k1', 1]
    assert k1['exact'] is not None and van['exact'] is None
    # the test split too (prepare_data's second half of the held-out text), Jacobi R=3 and exact, as on val
    assert k1['test_loss'] > 0 and k1['test_loss_exact'] > 0 and van['test_loss'] > 0 and van['test_loss_exact'] is None
    assert k1['test_loss'] != k1['jacobi']
    assert van['iters'] == k1['iters'] == 2 and flops['iters'] > 2
    assert abs(flops['train_flops'] / k1['train_flops'] - 1) < 0.1  # matched training FLOPs, to one iteration
    # K=1 and Pause K=1 decode two slots per token, vanilla one: twice the cache and a little more than twice the
    # trunk's FLOPs (the second slot attends to one more key), the vocabulary projection once
    assert k1['kv_bytes_per_token'] == pause['kv_bytes_per_token'] == 2 * van['kv_bytes_per_token']
    head = 2 * 16 * 512
    assert 2 < (k1['inference_flops_per_token'] - head) / (van['inference_flops_per_token'] - head) < 2.5
    assert pause['config']['pause_token_id'] == pause['model_args']['pause_token_id'] == 519
    assert [x['seed'] for x in by.values()] == [1, 2] * 4 and len(k1['curve']) == 3  # iterations 0, 1, 2
    table = (tmp_path / 'res' / 'results.md').read_text()
    assert 'PonderLM-2 K=1' in table and 'training FLOPs of K=1' in table and 'Pause K=1' in table
    assert 'Pause K=1 - PonderLM-2 K=1: mean' in table and 'Pause K=1 - vanilla: mean' in table
    assert 'vanilla - PonderLM-2 K=1: mean' in table and 'PonderLM-2 K=1 - vanilla: mean' not in table  # once
    pngs = ('val_loss_tokens.png', 'val_loss_flops.png', 'val_loss_inference_flops.png')
    for png in pngs:
        assert (tmp_path / 'res' / png).stat().st_size > 0
    # again: runs with a result file are skipped, a trained run without one is evaluated (its eval reused) again
    kept = (tmp_path / 'res' / 'vanilla-s2.json').read_text()
    (tmp_path / 'res' / 'vanilla-s2.json').unlink()
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count('skipping it') == 7 and r.stdout.count('reusing it') == 1, \
        r.stdout[-3000:]
    assert json.loads((tmp_path / 'res' / 'vanilla-s2.json').read_text()) == json.loads(kept)  # the same run
    # the run folders gone (a new machine): the report comes from the result files alone, the same table
    shutil.rmtree(tmp_path / 'out')
    for png in pngs:
        (tmp_path / 'res' / png).unlink()
    (tmp_path / 'res' / 'results.md').unlink()
    r = subprocess.run([*cmd, '--report=True'], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / 'res' / 'results.md').read_text() == table
    assert all((tmp_path / 'res' / png).stat().st_size > 0 for png in pngs)


def test_results_of_another_budget_and_broken_files_are_one_error(tmp_path):
    """A run whose result file is already there with another budget is refused before any work (the file would be
    replaced and the report would mix budgets), and so is a result file that is not one."""
    from helpers import assert_one_error
    res = tmp_path / 'res'
    res.mkdir()
    committed = {'name': 'vanilla', 'seed': 1, 'config': {'max_iters': 600, 'batch_size': 16, 'block_size': 128,
                                                           'gradient_accumulation_steps': 1, 'learning_rate': 2e-3}}
    (res / 'vanilla-s1.json').write_text(json.dumps(committed))
    cmd = [sys.executable, str(ROOT / 'experiments' / 'repro.py'), f'--results_dir={res}',
           f'--data_dir={tmp_path / "no-data"}', f'--out_root={tmp_path / "out"}']
    r = subprocess.run([*cmd, '--runs=vanilla', '--seeds=1', '--max_iters=100'], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert_one_error(r, 2, 'vanilla-s1.json', 'max_iters 600 there, 100 here', '--results_dir')
    assert json.loads((res / 'vanilla-s1.json').read_text()) == committed and not (tmp_path / 'out').exists()
    (res / 'loop-k1-s1.json').write_text('{"name": "loop-k1", "se')  # cut short
    r = subprocess.run([*cmd, '--report=True'], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_error(r, 2, 'loop-k1-s1.json', 'no repro.py result file')


def load_repro():
    spec = importlib.util.spec_from_file_location('repro', ROOT / 'experiments' / 'repro.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_inference_plots_labels_stay_apart_in_order_and_on_the_figure():
    """The labels' column: every two at least the gap apart, in their points' order, none outside 0-1, and each at
    its point where nothing crowds it; every run has its own color and line style."""
    repro = load_repro()
    ys = [0.50, 0.10, 0.11, 0.12, 0.90, 0.995, 1.0, -0.2]
    h = repro.label_heights(ys, gap=0.05)
    by_point = [h[i] for i in sorted(range(len(ys)), key=lambda i: ys[i])]
    assert all(b - a >= 0.05 - 1e-12 for a, b in zip(by_point, by_point[1:]))
    assert 0.0 <= min(h) and max(h) <= 1.0
    assert h[0] == 0.50 and h[1] == 0.10  # uncrowded: at its point
    assert h[3] > h[2] > h[1] and h[5] < h[6] == 1.0  # crowded: pushed apart, the top one at the edge
    rng = random.Random(0)
    for _ in range(200):
        ys = [rng.uniform(-0.1, 1.1) for _ in range(rng.randint(1, 20))]
        h = repro.label_heights(ys, gap=1 / 22)
        by_point = sorted(zip(ys, h))
        assert all(b[1] - a[1] >= 1 / 22 - 1e-12 for a, b in zip(by_point, by_point[1:]))
        assert 0.0 <= min(h) and max(h) <= 1.0
    assert set(repro.STYLE) == set(repro.RUNS) and len(set(repro.STYLE.values())) == len(repro.RUNS)


def test_an_evaluation_is_reused_until_its_checkpoint_or_its_split_changes(tmp_path, monkeypatch):
    """eval.json is reused while newer than the checkpoint and the split's token file: data prepared again (the
    val split halved when test was cut from it) is evaluated again, not reported beside a fresh test loss."""
    repro = load_repro()
    run, data = tmp_path / 'run', tmp_path / 'data'
    run.mkdir()
    data.mkdir()
    monkeypatch.setattr(repro, 'data_dir', str(data))
    calls = []

    def fake_eval(out_dir, out, split):
        calls.append(split)
        (tmp_path / 'run' / f'{os.path.basename(out)}.json').write_text(json.dumps({'rows': [{'name': 'R=0',
                                                                                             'loss': len(calls)}]}))
    monkeypatch.setattr(repro, 'run_eval', fake_eval)
    for name in ('run/ckpt.pt', 'data/val.bin', 'data/test.bin'):
        (tmp_path / name).write_bytes(b'x')
        os.utime(tmp_path / name, (1e9, 1e9))
    assert [repro.eval_losses(str(run)) for _ in range(2)] == [(1, None)] * 2 and calls == ['val']
    assert repro.eval_losses(str(run), 'test') == (2, None)
    os.utime(data / 'val.bin')  # prepared again, now
    assert repro.eval_losses(str(run)) == (3, None) and repro.eval_losses(str(run), 'test') == (2, None)
    os.utime(run / 'ckpt.pt', (2e9, 2e9))  # trained on
    assert repro.eval_losses(str(run), 'test') == (4, None) and calls == ['val', 'test', 'val', 'test']


def test_a_report_checks_every_result_file_and_where_it_writes_before_it_writes(tmp_path, monkeypatch, capsys):
    """--report=True over a result file without the usual keys (was a KeyError), with a string seed (a TypeError), a
    directory named like one (IsADirectoryError), or into a results_dir it cannot write (a PermissionError after
    the table was printed): one UserError each, before anything is printed or written. And a training command
    refuses, before any work, an --out_root that is a file (NotADirectoryError in a worker thread) and a seed
    given twice (two runs racing into one out_dir)."""
    repro = load_repro()
    from nanoponder.runtime import UserError
    good = json.loads((ROOT / 'experiments' / 'results' / 'vanilla-s1337.json').read_text())
    res = tmp_path / 'res'
    res.mkdir()
    monkeypatch.setattr(repro, 'results_dir', str(res))
    (res / 'vanilla-s1337.json').write_text(json.dumps(good))
    cases = [('vanilla-s1.json', json.dumps({'name': 'vanilla', 'seed': 1, 'config': {}}),
              'missing or mistyped: label'),
             ('vanilla-s2.json', json.dumps({**good, 'seed': 'two'}), 'missing or mistyped: seed'),
             ('old.json', None, 'old.json is no repro.py result file'),
             ('vanilla-s3.json', json.dumps({**good, 'seed': 3, 'curve': [[0, 'x']]}), 'missing or mistyped: curve'),
             ('vanilla-s4.json', json.dumps({**good, 'seed': 4, 'curve': good['curve'][:-1]}),
              'val curves at different points'),  # the seeds' mean curve would be a numpy error after results.md
             ('vanilla-s5.json', json.dumps({**good, 'seed': 5, 'val_tokens': 29533}), 'do not compare')]
    capsys.readouterr()
    for name, text, needle in cases:
        if text is None:
            (res / name).mkdir()
        else:
            (res / name).write_text(text)
        with pytest.raises(UserError, match=needle):
            repro.write_report()
        if text is None:
            (res / name).rmdir()
        else:
            (res / name).unlink()
    assert capsys.readouterr().out == '' and sorted(os.listdir(res)) == ['vanilla-s1337.json']
    # runs about to be made on today's val split, beside files of the old one: refused before any training
    with pytest.raises(UserError, match='whole held-out tenth.*do not compare'):
        repro.check_one_val_split([good], 29533)
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(tempfile, 'TemporaryFile', refused)  # what an unwritable results_dir does (we may be root)
    capsys.readouterr()
    with pytest.raises(UserError, match='--results_dir: cannot write'):
        repro.write_report()
    assert capsys.readouterr().out == '' and sorted(os.listdir(res)) == ['vanilla-s1337.json']
    monkeypatch.undo()
    (tmp_path / 'a-file').write_text('mine')
    for key, value, needle in (('out_root', str(tmp_path / 'a-file'), '--out_root'),
                               ('seeds', '1,1', 'more than once')):
        monkeypatch.setattr(repro, 'results_dir', str(res))
        monkeypatch.setattr(repro, 'runs', 'vanilla')
        monkeypatch.setattr(repro, 'data_dir', str(tmp_path / 'no-data'))
        monkeypatch.setattr(repro, 'out_root', str(tmp_path / 'out'))
        monkeypatch.setattr(repro, key, value)
        with pytest.raises(UserError, match=needle):
            repro.main()
        assert not (tmp_path / 'out').exists() and not (tmp_path / 'no-data').exists()
    assert (tmp_path / 'a-file').read_text() == 'mine'
    (tmp_path / 'train.log').write_text('config: seed = 1\nerror: beta1 must be in [0, 1), got 1.5\n')
    assert repro.last_error(tmp_path / 'train.log') == 'error: beta1 must be in [0, 1), got 1.5'  # not the command


def load_cuda_check():
    spec = importlib.util.spec_from_file_location('cuda_check', ROOT / 'experiments' / 'cuda_check.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines things only: its configurator runs under __main__
    return module


def test_cuda_check_compares_loss_and_every_gradient():
    """experiments/cuda_check.py's comparison, on a CPU against itself: the same weights in fp32 agree exactly,
    bf16 autocast is near but not equal (within its tolerance), and a model that differs in one weight is off."""
    cc = load_cuda_check()
    cpu = torch.device('cpu')
    gpt = tiny('ponderlm2-k1', n_jacobi=2)
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    reference = cc.loss_and_grads(gpt, idx, targets, cpu, torch.float32)
    same = cc.compare(reference, cc.loss_and_grads(gpt, idx, targets, cpu, torch.float32), 1e-6)
    assert same['ok'] and same['loss_rel_diff'] == 0 and same['grad_rel_error'] == 0
    bf16 = cc.compare(reference, cc.loss_and_grads(gpt, idx, targets, cpu, torch.bfloat16), cc.bf16_tolerance)
    assert bf16['ok'] and 0 < bf16['grad_rel_error'] < cc.bf16_tolerance
    assert bf16['grad_rel_error'] > cc.fp32_tolerance  # bf16 is no fp32: the fp32 tolerance tells them apart
    # truncated backpropagation: the same loss, another gradient (what the CUDA check compares is the loss)
    truncated = cc.loss_and_grads(gpt, idx, targets, cpu, torch.float32, grad_passes=1)
    assert truncated[0] == reference[0] and not cc.compare(reference, truncated, cc.fp32_tolerance)['ok']
    other = tiny('ponderlm2-k1', n_jacobi=2)
    with torch.no_grad():
        other.layers[1].mlp.dense_4h_to_h.weight.mul_(1.01)
    off = cc.compare(reference, cc.loss_and_grads(other, idx, targets, cpu, torch.float32), cc.fp32_tolerance)
    assert not off['ok'] and off['grad_rel_error'] > cc.fp32_tolerance


def test_the_truncation_table_sets_the_variants_beside_full_k1_on_the_test_split():
    """Made-up result files: per run the test loss, the exact - Jacobi gap, the paired difference to K=1 per seed,
    the cost and the change per Jacobi pass; no table without a truncated variant."""
    repro = load_repro()

    def result(name, seed, test_loss, exact=None, change=None):
        passes = [dict(passes=r, loss=test_loss, change=c, distance_to_exact=None) for r, c in enumerate(change)] \
            if change else []
        return dict(name=name, seed=seed, label=name, test_loss=test_loss, test_loss_exact=exact, train_flops=1e12,
                    seconds=120.0, test_jacobi_passes=passes)
    k1 = [result('ponderlm2-k1', s, 3.0 + d, 3.0 + d + 1e-5, [None, 1e-2, 1e-3, 1e-4]) for s, d in ((1, 0), (2, .1))]
    assert repro.truncation_table(k1 + [result('vanilla', 1, 3.2)]) == []
    g1 = [result('ponderlm2-k1-g1', s, 3.01 + d, 3.01 + d + 3e-5, [None, 2e-2, 2e-3, 2e-4])
          for s, d in ((1, 0), (2, .12))]
    lines = repro.truncation_table(k1 + g1 + [result('vanilla', 1, 3.2)])
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]] for line in lines
            if line.startswith('| ') and not line.startswith('| run')}
    assert list(rows) == ['ponderlm2-k1', 'ponderlm2-k1-g1', 'vanilla']  # RUNS order
    assert rows['ponderlm2-k1-g1'][:4] == ['2', '3.0700 (3.0100-3.1300)', '+0.00003 (+0.00003-+0.00003)',
                                          '+0.0100, +0.0300']
    assert rows['ponderlm2-k1'][5:] == ['2.0 (2.0-2.0)', '1.0e-02, 1.0e-03, 1.0e-04']
    assert rows['vanilla'][2:4] == ['-', '+0.2000'] and rows['vanilla'][6] == '-'


def test_the_verdicts_are_the_families_comparisons_on_test_with_holm_over_the_whole_family(tmp_path, monkeypatch):
    """Made-up test losses: the family's comparisons paired by seed (seeds outside the family left out), Holm over
    the whole family (a comparison without seeds counting p = 1), the interim mark, the words from the adjusted p."""
    from nanoponder.stats import paired_test
    repro = load_repro()
    family = {'seeds': [1, 2, 3, 4], 'alpha': 0.05, 'suggestive': 0.2, 'margin': 0.01, 'comparisons': [
        {'id': 'a', 'run': 'ponderlm2-k1', 'base': 'vanilla', 'test': 'two-sided'},
        {'id': 't', 'run': 'ponderlm2-k1-g1', 'base': 'ponderlm2-k1', 'test': 'non-inferiority'},
        {'id': 'b', 'run': 'ponderlm2-k1', 'base': 'vanilla-2x', 'test': 'two-sided'}]}
    (tmp_path / 'family.json').write_text(json.dumps(family))
    monkeypatch.setattr(repro, 'family', str(tmp_path / 'family.json'))
    a = [-0.03, -0.04, -0.035, -0.02]
    t = [0.002, -0.001, 0.003]  # seeds 1-3 only: interim
    results = [dict(name='vanilla', seed=s, test_loss=3.0) for s in (1, 2, 3, 4, 9)]
    results += [dict(name='ponderlm2-k1', seed=s, test_loss=3.0 + d) for s, d in zip((1, 2, 3, 4, 9), a + [5.0])]
    results += [dict(name='ponderlm2-k1-g1', seed=s, test_loss=3.0 + a[s - 1] + d) for s, d in zip((1, 2, 3), t)]
    lines = repro.verdicts(results)
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]] for line in lines
            if line.startswith('| ') and not line.startswith('| id')}
    ca, ct = paired_test(a), paired_test(t, 'non-inferiority', 0.01)
    assert ca['p'] < ct['p'] < 0.02  # (0.0053 and 0.0093)
    # Holm over the family of three, b (no seeds) counting p = 1: a first (x3), then t (x2), then b (x1)
    pa, pt = 3 * ca['p'], max(3 * ca['p'], 2 * ct['p'])
    assert rows['a'][1:5] == ['4', f"{ca['mean']:+.4f}", f"[{ca['low']:+.4f}, {ca['high']:+.4f}]", f"{ca['p']:.1e}"]
    assert rows['a'][5:8] == [f"{pa:.1e}", f"{ca['p_sign_flip']:.1e}", 'holds']
    assert rows['t'][0].endswith('(non-inferiority, margin 0.01)') and rows['t'][5] == f"{pt:.1e}"
    assert rows['t'][7] == 'non-inferior (interim: 3 of 4 seeds)'
    assert rows['b'][1:] == ['0', '-', '-', '-', '-', '-', 'not yet run', '-']
    assert repro.verdicts([dict(r, test_loss=None) for r in results]) == []  # val-only files: no verdicts


def test_the_adaptive_curve_reads_crossings_and_the_pythia_break_even():
    spec = importlib.util.spec_from_file_location('adaptive_curve', ROOT / 'experiments' / 'adaptive_curve.py')
    ac = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ac)
    from model import GPTConfig
    from nanoponder.cost import inference_flops_per_token
    curve = [(5.0, 3.00), (4.0, 3.10), (3.0, 3.30)]  # (FLOPs, loss) of a sweep, in any order
    assert ac.reach(curve, 3.05) == pytest.approx(4.5)  # halfway between 4 and 5
    assert ac.reach(curve, 3.40) == 3.0 and ac.reach(curve, 2.9) is None
    assert ac.at(curve, 3.5) == pytest.approx(3.20) and ac.at(curve, 6.0) is None
    for shape in ('pythia-70m', 'pythia-1.4b'):  # K=1: the check pays once the share skipped passes 2 head / rest
        config = GPTConfig.preset(shape, n_thoughts=1)
        head = 2 * config.n_embd * config.vocab_size
        closed = 2 * head / (inference_flops_per_token(config) - head)
        assert ac.break_even(config) == pytest.approx(closed, rel=1e-9)
    rows = [dict(threshold=t, skipped=s, stopped=s, loss=l, flops_per_token=f * 1e6, tokens_per_second=100.0,
                 flip_rate=0.0, flip_decisions=64) for t, s, l, f in ((1, 0, 3.0, 5.0), (0, 1, 3.3, 3.0))]
    other = [{**r, 'loss': r['loss'] + 0.02, 'flip_rate': 0.5} for r in rows]  # a second seed
    report = ac.mean_report({1: ({'tokens': 1000, 'config': {}, 'adaptive': rows}, 12.0),
                             2: ({'tokens': 1000, 'config': {}, 'adaptive': other}, 13.0)})
    assert report['wall_seconds'] == 25.0 and report['adaptive'][1]['flip_rate'] == 0.25  # 32 of 128 decisions
    point = ac.mean_point({1: dict(label='vanilla', loss=3.19, flops=2.5e6), 2: dict(label='vanilla', loss=3.21,
                                                                                     flops=2.5e6)})
    text = ac.tables({'k1': report}, [point])
    assert '| 0 | 100.0% | 3.3100 (3.3000–3.3200) | 3.00M | 100 | 25.00% of 128 |' in text
    assert 'per seed, the cheapest measured point at or below its loss: 1 τ=1 (2.00x), 2 τ=1 (2.00x)' in text
    text = ac.tables({'k1': ac.mean_report({1: ({'tokens': 1000, 'config': {}, 'adaptive': rows}, 12.0)})},
                     [ac.mean_point({1: dict(label='vanilla', loss=3.2, flops=2.5e6)})])
    assert '| 0 | 100.0% | 3.3000 | 3.00M | 100 | 0.00% of 64 |' in text
    assert 'cheapest measured point at or below its loss is τ=0, 3.00M FLOPs (1.20x its), 3.3000' not in text
    assert 'the curve reaches its loss from 3.67M (1.47x)' in text and 'its FLOPs are outside the curve' in text
    assert 'cheapest measured point at or below its loss is τ=1, 5.00M FLOPs (2.00x its), 3.0000' in text


@pytest.mark.parametrize('args, needle', [
    (['--thresholds=()'], 'thresholds must be numbers in [0, 1]'),
    (['--runs=,'], 'runs names no run'),
    (['--points=vanilla'], 'vanilla-s1337.json is missing: run `python experiments/repro.py --runs=vanilla'),
    (['--points=', '--runs=vanilla'], 'vanilla-s1337/ckpt.pt is missing')])
def test_the_adaptive_curve_checks_its_inputs_before_any_work(tmp_path, args, needle):
    from helpers import assert_one_error
    r = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'adaptive_curve.py'), f'--out={tmp_path / "a"}',
                        f'--out_root={tmp_path / "runs"}', f'--results_dir={tmp_path / "results"}', *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_error(r, 2, needle)
    assert not (tmp_path / 'a').exists()  # nothing written


def test_cuda_checks_adaptive_decoding_part_runs_its_plumbing_on_a_cpu(monkeypatch):
    """Part 3 of experiments/cuda_check.py on the CPU against itself: the same batch decides the same (no flips),
    about half of the thoughts are skipped at the median threshold, and each way of decoding has a speed. (Batch 1
    against the batch may flip a decision this near the threshold: the two round differently.)"""
    cc = load_cuda_check()
    monkeypatch.setattr(cc, 'loss_model', 'pythia-14m')
    monkeypatch.setattr(cc, 'adaptive_tokens', 12)
    r = cc.check_adaptive(torch.device('cpu'), rows=4)
    assert r['flips_vs_cpu'] == 0 and 0 <= r['flips_batch_1'] < 0.2 and 0.2 < r['skipped'] < 0.8
    assert len(r['tokens_per_s']) == 4 and all(v > 0 for v in r['tokens_per_s'].values())
    assert 'adaptive decoding (fp32' in cc.summary(
        {'seq_len': 8, 'model': 'm', 'method': 'k1', 'cpu_loss': 1.0,
         **{k: {'loss': 1.0, 'loss_rel_diff': 0.0, 'grad_rel_error': 0.0, 'ok': True, 'tolerance': 1.0}
            for k in ('fp32', 'bf16', 'truncated')}}, {}, r)
