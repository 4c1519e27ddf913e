"""experiments/repro.py end to end on a toy budget: it prepares its BPE data from a local text, trains vanilla,
PonderLM-2 K=1 and the FLOPs-matched vanilla over two seeds, evaluates them with eval.py, and writes its table and
plots; a second call reuses the finished runs."""
import json
import random
import subprocess
import sys

from helpers import ENV, ROOT

TOY = ('--model= --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 --batch_size=2 --max_iters=2 --eval_interval=1 '
       '--eval_iters=1 --warmup_iters=1 --dtype=float32')


def test_repro_runs_end_to_end_on_a_toy_budget(tmp_path):
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = ''.join(' '.join(rng.choice(words) for _ in range(12)) + '\n' for _ in range(600))
    (tmp_path / 'input.txt').write_text(text)
    cmd = [sys.executable, str(ROOT / 'experiments' / 'repro.py'), f'--input={tmp_path / "input.txt"}',
           f'--data_dir={tmp_path / "data"}', f'--out_root={tmp_path / "out"}', '--seeds=1,2',
           '--runs=vanilla,ponderlm2-k1,vanilla-flops', f'--train_args={TOY}']
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)  # not from ROOT
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / 'data' / 'meta.json').read_text())['tokenizer'] == 'bpe:512'
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert sorted((x['name'], x['seed']) for x in results) == sorted(
        (n, s) for n in ('vanilla', 'ponderlm2-k1', 'vanilla-flops') for s in (1, 2))
    by = {(x['name'], x['seed']): x for x in results}
    k1, van, flops = by['ponderlm2-k1', 1], by['vanilla', 1], by['vanilla-flops', 1]
    assert k1['exact'] is not None and van['exact'] is None
    assert van['iters'] == k1['iters'] == 2 and flops['iters'] > 2
    assert abs(flops['train_flops'] / k1['train_flops'] - 1) < 0.1  # matched training FLOPs, to one iteration
    table = (tmp_path / 'out' / 'results.md').read_text()
    assert 'PonderLM-2 K=1' in table and 'training FLOPs of K=1' in table and '- vanilla: mean' in table
    for png in ('val_loss_tokens.png', 'val_loss_flops.png'):
        assert (tmp_path / 'out' / png).stat().st_size > 0
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count('reusing it') == 6, r.stdout[-3000:]
