"""
The small CPU reproduction of the papers' claims: train vanilla, PonderLM-2 K=1 and K=2, PonderLM N=3 and a
vanilla model with twice the non-embedding parameters on the same tokens with the same init, then report
each final val loss, with Jacobi thoughts (R=3, as the papers) and with exact sequential thoughts.

    python prepare_data.py --dataset=shakespeare            # once (offline: add --input=PATH --tokenizer=PATH)
    python experiments/repro.py                             # ~25 min on 2 CPU cores; results in out-repro/
    python experiments/repro.py --seeds=1337,1338           # add a seed: runs already trained are reused
    python experiments/repro.py --runs=vanilla,ponderlm2-k1 --max_iters=50   # a quicker look

It works from any directory: train.py, the config (experiments/repro_shakespeare.py), the data directory
(data/shakespeare) and out_root (out-repro) default to paths in the repository. Runs are named by method
(model.py's names): vanilla, vanilla-2x (n_layer=12: twice the non-embedding parameters), ponderlm2-k1,
ponderlm2-k2, ponderlm1-n3. Each is `python train.py experiments/repro_shakespeare.py <its method>
--data_dir=<data_dir> --out_dir=<out_root>/<name>-s<seed>` with OMP_NUM_THREADS=1 (two single-threaded runs
share two cores better than one run with two threads); its log is <out_root>/<name>-s<seed>/train.log.
A run whose train_time.json exists is finished and reused; delete its folder to train it again (a folder
without one, left by an interrupted repro, is trained again from scratch). Writes <out_root>/results.md,
results.json and the val-loss plot val_loss.png.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)  # run as a script, this file's folder is on the path, not the repository's modules
from data import read_meta, read_tokens  # noqa: E402
from model import method_settings  # noqa: E402
from runtime import Checkpoint, UserError, atomic_write, failure, run_cli  # noqa: E402

# the runs: name -> (method, extra train.py overrides, what sets it apart from its method's label),
# most expensive first so two workers finish together
RUNS = {
    'ponderlm1-n3': ('ponderlm1-n3', [], ''),
    'ponderlm2-k2': ('ponderlm2-k2', [], ''),
    'ponderlm2-k1': ('ponderlm2-k1', [], ''),
    'vanilla-2x': ('vanilla', ['--n_layer=12'], '2x non-embedding params'),
    'vanilla': ('vanilla', [], ''),
}
TRAIN = os.path.join(ROOT, 'train.py')
# -----------------------------------------------------------------------------
config = os.path.join(ROOT, 'experiments', 'repro_shakespeare.py')
data_dir = os.path.join(ROOT, 'data', 'shakespeare')
out_root = os.path.join(ROOT, 'out-repro')
runs = ','.join(RUNS)
seeds = '1337'
jobs = 2
max_iters = 0  # 0 -> the config's
# -----------------------------------------------------------------------------


def train_command(name, seed, out_dir):
    method, extra, _ = RUNS[name]
    method_args = [f'--{key}={value}' for key, value in method_settings(method).items()]
    cmd = [sys.executable, TRAIN, os.path.abspath(config), *method_args, *extra,
           f'--data_dir={os.path.abspath(data_dir)}', f'--out_dir={out_dir}', f'--seed={seed}',
           f'--wandb_run_name=repro-{name}-s{seed}',
           '--overwrite=True']  # what a folder without train_time.json holds is an unfinished run: start over
    if max_iters:
        cmd.append(f'--max_iters={max_iters}')
    return cmd


def train(name, seed):
    """Train one run, unless an earlier repro.py already finished it (its train_time.json is written last)."""
    out_dir = os.path.join(os.path.abspath(out_root), f'{name}-s{seed}')
    done = os.path.join(out_dir, 'train_time.json')
    if os.path.exists(done):
        with open(done) as f:
            seconds = json.load(f)['seconds']
        print(f"{name} seed {seed}: already trained ({done}), reusing it", flush=True)
        return out_dir, seconds
    os.makedirs(out_dir, exist_ok=True)
    cmd = train_command(name, seed, out_dir)
    t0 = time.time()
    with open(os.path.join(out_dir, 'train.log'), 'w') as log:
        r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode != 0:
        raise failure(f"{' '.join(cmd)} failed (exit {r.returncode}); see {out_dir}/train.log")
    seconds = time.time() - t0
    with atomic_write(done, 'w') as f:
        json.dump({'seconds': seconds}, f)
    print(f"{name} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return out_dir, seconds


@torch.no_grad()
def val_losses(model, val):
    """Mean loss over every whole block of the val tokens: Jacobi thoughts (the config's n_jacobi, the papers'
    number) and, for thought models, exact sequential thoughts (teacher-forced through the KV cache)."""
    T = model.config.block_size
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


def evaluate(name, seed, out_dir, seconds):
    """One run's results, from its checkpoint (read once) and its log."""
    ckpt = Checkpoint.load(os.path.join(out_dir, 'ckpt.pt'))
    model = ckpt.build_model().eval()
    note = RUNS[name][2]
    label = model.config.method_label + (f", {note}" if note else '')
    # the data the run trained on; a relative data_dir (a run trained by hand) is from the repository root
    jacobi, exact = val_losses(model, read_tokens(os.path.join(ROOT, ckpt.config['data_dir']), 'val'))
    return dict(name=name, label=label, method=model.config.method, seed=seed, jacobi=jacobi, exact=exact,
                seconds=seconds, params=model.get_num_params(), curve=val_curve(out_dir))


def by_run(results):
    """name -> that run's results over the seeds, in RUNS order."""
    return {name: [r for r in results if r['name'] == name] for name in RUNS if any(r['name'] == name for r in results)}


def plot(results, path):
    """Val-loss curves: each run's mean over the seeds, with the min-max band where there are several."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runs_ in by_run(results).values():
        iters = [it for it, _ in runs_[0]['curve']]
        losses = np.array([[loss for _, loss in r['curve']] for r in runs_])  # (seeds, evals)
        line, = ax.plot(iters, losses.mean(0), label=f"{runs_[0]['label']} ({len(runs_)} seed{'s' * (len(runs_) > 1)})")
        if len(runs_) > 1:
            ax.fill_between(iters, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel('iteration (1,024 tokens each)')
    ax.set_ylabel('val loss (Jacobi thoughts, R=3)')
    ax.set_ylim(top=8)
    ax.set_title('Tiny Shakespeare, Pythia tokenizer, 6x128 trunk')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=120)


def spread(values, fmt):
    """'mean (min-max)' over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results):
    lines = ['| run | seeds | non-emb params | val loss (Jacobi R=3) | val loss (exact thoughts) | train time (min) |',
             '|---|---|---|---|---|---|']
    for runs_ in by_run(results).values():
        exact = spread([r['exact'] for r in runs_], '{:.4f}') if runs_[0]['exact'] is not None else '-'
        lines.append(f"| {runs_[0]['label']} | {','.join(str(r['seed']) for r in runs_)} "
                     f"| {runs_[0]['params'] / 1e6:.2f}M | {spread([r['jacobi'] for r in runs_], '{:.4f}')} | {exact} "
                     f"| {spread([r['seconds'] / 60 for r in runs_], '{:.1f}')} |")
    return '\n'.join(lines)


def chosen_runs():
    asked = [n.strip() for n in runs.split(',') if n.strip()]
    unknown = [n for n in asked if n not in RUNS]
    if unknown or not asked:
        raise UserError(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    return [n for n in RUNS if n in asked]


def chosen_seeds():
    try:
        return [int(s) for s in str(seeds).split(',')]
    except ValueError:
        raise UserError(f"seeds must be integers separated by commas, got {seeds!r}") from None


def check_inputs():
    if jobs < 1:
        raise UserError(f"jobs must be >= 1, got {jobs}")
    if not os.path.isfile(config):
        raise UserError(f"config file not found: {config}")
    read_meta(data_dir)  # each says how to make the data directory when it is missing
    read_tokens(data_dir, 'train')
    read_tokens(data_dir, 'val')


def write_results(results):
    md = table(results)
    print(md)
    with atomic_write(os.path.join(out_root, 'results.md'), 'w') as f:
        f.write(md + '\n')
    with atomic_write(os.path.join(out_root, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out_root, 'val_loss.png'))
    print(f"wrote {out_root}/results.md, results.json, val_loss.png")


def main():
    names, seed_list = chosen_runs(), chosen_seeds()
    check_inputs()
    tasks = [(n, s) for s in seed_list for n in names]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the training subprocesses
        trained = list(pool.map(lambda task: train(*task), tasks))
    results = [evaluate(name, seed, out_dir, seconds) for (name, seed), (out_dir, seconds) in zip(tasks, trained)]
    write_results(results)
    print(f"total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    run_cli(main)
