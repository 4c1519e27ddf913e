"""
The small CPU reproduction of the papers' claims: train vanilla, PonderLM-2 K=1 and K=2, PonderLM N=3 and a
vanilla model with twice the non-embedding parameters on the same tokens with the same init, then report
each final val loss, with Jacobi thoughts (R=3, as the papers) and with exact sequential thoughts.

    python prepare_data.py --dataset=shakespeare    # once (offline: add --input=PATH --tokenizer=PATH)
    python repro.py                                 # ~25 min on 2 CPU cores; results in out-repro/
    python repro.py --seeds=1337,1338               # add a seed: runs already trained are reused
    python repro.py --runs=vanilla,ponder_k1 --max_iters=50   # a quicker look

Each run is `python train.py config/repro_shakespeare.py <its overrides> --out_dir=out-repro/<name>` with
OMP_NUM_THREADS=1 (two single-threaded runs share two cores better than one run with two threads); its
log is out-repro/<name>-s<seed>/train.log. Delete a run's folder to train it again. Writes out-repro/results.md, out-repro/results.json and the val-loss
plot out-repro/val_loss.png.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model import GPT, GPTConfig

# the runs: name -> (label, train.py overrides), most expensive first so two workers finish together
RUNS = {
    'ponderlm1_n3': ('PonderLM N=3', ['--n_ponder=3']),
    'ponder_k2': ('PonderLM-2 K=2', ['--n_thoughts=2']),
    'ponder_k1': ('PonderLM-2 K=1', ['--n_thoughts=1']),
    'vanilla_2x': ('vanilla, 2x non-embedding params', ['--n_layer=12']),
    'vanilla': ('vanilla', []),
}
config = 'config/repro_shakespeare.py'
out_root = 'out-repro'
runs = ','.join(RUNS)
seeds = '1337'
jobs = 2
max_iters = 0  # 0 -> the config's
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())


def train(name, seed):
    """Train one run, unless an earlier repro.py already finished it (its train_time.json is written last)."""
    out_dir = os.path.join(out_root, f'{name}-s{seed}')
    done = os.path.join(out_dir, 'train_time.json')
    if os.path.exists(done):
        with open(done) as f:
            seconds = json.load(f)['seconds']
        print(f"{name} seed {seed}: already trained ({done}), reusing it", flush=True)
        return out_dir, seconds
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, 'train.py', config, *RUNS[name][1], f'--out_dir={out_dir}', f'--seed={seed}',
           f'--wandb_run_name=repro-{name}-s{seed}']
    if max_iters:
        cmd.append(f'--max_iters={max_iters}')
    t0 = time.time()
    with open(os.path.join(out_dir, 'train.log'), 'w') as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {r.returncode}); see {out_dir}/train.log")
    seconds = time.time() - t0
    with open(done, 'w') as f:
        json.dump({'seconds': seconds}, f)
    print(f"{name} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return out_dir, seconds


@torch.no_grad()
def val_losses(out_dir):
    """Mean loss over every whole block of val.bin: Jacobi thoughts (n_jacobi from the config, the papers'
    number) and, for thought models, exact sequential thoughts (teacher-forced through the KV cache)."""
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    model = GPT.from_state_dict(GPTConfig(**ckpt['model_args']), ckpt['model']).eval()
    T = model.config.block_size
    val = np.memmap(os.path.join(ckpt['config']['data_dir'], 'val.bin'), dtype=np.uint16, mode='r')
    n = (len(val) - 1) // T
    jacobi, exact = [], []
    for i in range(0, n, 16):  # 16 blocks at a time
        b = torch.arange(i, min(i + 16, n))
        idx = torch.from_numpy(np.stack([val[j * T:j * T + T + 1].astype(np.int64) for j in b.tolist()]))
        x, y = idx[:, :-1], idx[:, 1:]
        jacobi.append(model(x, y)[1].item() * len(b))
        if model.config.n_thoughts:
            logits = model.sequential_logits(x)
            exact.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item() * len(b))
    return sum(jacobi) / n, (sum(exact) / n if exact else None)


def val_curve(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        entries = [json.loads(line) for line in f]
    return [(e['iter'], e['val_loss']) for e in entries if 'val_loss' in e]


def by_method(results):
    """name -> that method's results over the seeds, in RUNS order."""
    return {name: [r for r in results if r['name'] == name] for name in RUNS if any(r['name'] == name for r in results)}


def plot(results, path):
    """Val-loss curves: each method's mean over the seeds, with the min-max band where there are several."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs_ in by_method(results).items():
        iters = [it for it, _ in runs_[0]['curve']]
        losses = np.array([[loss for _, loss in r['curve']] for r in runs_])  # (seeds, evals)
        line, = ax.plot(iters, losses.mean(0), label=f"{RUNS[name][0]} ({len(runs_)} seed{'s' * (len(runs_) > 1)})")
        if len(runs_) > 1:
            ax.fill_between(iters, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel('iteration (1,024 tokens each)')
    ax.set_ylabel('val loss (Jacobi thoughts, R=3)')
    ax.set_ylim(top=8)
    ax.set_title('Tiny Shakespeare, Pythia tokenizer, 6x128 trunk')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def spread(values, fmt):
    """'mean (min-max)' over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results):
    lines = ['| run | seeds | non-emb params | val loss (Jacobi R=3) | val loss (exact thoughts) | train time (min) |',
             '|---|---|---|---|---|---|']
    for name, runs_ in by_method(results).items():
        exact = spread([r['exact'] for r in runs_], '{:.4f}') if runs_[0]['exact'] is not None else '-'
        lines.append(f"| {RUNS[name][0]} | {','.join(str(r['seed']) for r in runs_)} | {runs_[0]['params'] / 1e6:.2f}M "
                     f"| {spread([r['jacobi'] for r in runs_], '{:.4f}')} | {exact} "
                     f"| {spread([r['seconds'] / 60 for r in runs_], '{:.1f}')} |")
    return '\n'.join(lines)


def main():
    names = [n for n in RUNS if n in runs.split(',')]
    unknown = set(runs.split(',')) - set(RUNS)
    if unknown or not names:
        raise SystemExit(f"error: unknown run(s) {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if not os.path.exists(os.path.join('data/shakespeare', 'train.bin')):
        raise SystemExit("error: data/shakespeare/train.bin not found: run `python prepare_data.py --dataset=shakespeare`")
    tasks = [(n, int(s)) for s in str(seeds).split(',') for n in names]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the training subprocesses
        trained = list(pool.map(lambda task: train(*task), tasks))
    results = []
    for (name, seed), (out_dir, seconds) in zip(tasks, trained):
        jacobi, exact = val_losses(out_dir)
        ckpt_args = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)['model_args']
        with torch.device('meta'):
            params = GPT(GPTConfig(**ckpt_args)).get_num_params()
        results.append(dict(name=name, seed=seed, jacobi=jacobi, exact=exact, seconds=seconds, params=params,
                            curve=val_curve(out_dir)))
    md = table(results)
    print(md)
    print(f"total wall time {(time.time() - t0) / 60:.1f} min")
    with open(os.path.join(out_root, 'results.md'), 'w') as f:
        f.write(md + '\n')
    with open(os.path.join(out_root, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out_root, 'val_loss.png'))
    print(f"wrote {out_root}/results.md, results.json, val_loss.png")


if __name__ == '__main__':
    main()
