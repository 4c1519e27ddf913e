"""
The CPU experiment of the README "Results": is it the thought or the compute? On Tiny Shakespeare with a 512-id BPE,
every run has the same tokens, the same init seed and the same 6x128 trunk, over several seeds:
  vanilla and PonderLM-2 K=1: equal parameters and tokens;
  vanilla-2x: vanilla with 2x the non-embedding parameters (12 layers), the inference FLOPs of K=1;
  PonderLM-2 K=2;
  vanilla-flops: vanilla trained on as many FLOPs as K=1 (more iterations on more tokens: more epochs);
  PonderLM N=3 (PonderLM v1);
  the official repository's baselines at K=1's extra compute: Pause K=1 (the extra slot without a thought in it),
  Loop K=1 (the extra pass through the layers without feeding anything back through the sequence) and Hidden N=1
  (the output added to the input instead of given a slot).
Every verdict reads the whole test split's loss (Jacobi R=3 for thought models, as the papers; their exact-thought
loss beside it); the val split draws the curves and picks the FLOPs-matched vanilla's best checkpoint. The family of
pre-registered comparisons is experiments/family.json; the report tests it (paired t, Holm, sign-flip).

    python experiments/repro.py --report=True   # the table, the verdicts and the plots, from experiments/results_v2/
    python experiments/repro.py --runs=ponderlm2-k1,loop-k1,vanilla --seeds=$(seq -s, 1337 1346) \
        --input=../shared/data/tinyshakespeare.txt   # some runs (names: RUNS below) over the ten seeds
    python experiments/repro.py   # every run, 3 seeds (~6 lane-hours, 3 h on 2 cores; skips the files it has)
    python experiments/repro.py --seeds=1337 --runs=vanilla,ponderlm2-k1 --max_iters=100 \
        --out_root=out-quick --results_dir=out-quick/results   # a quicker look, apart from the committed runs
    python experiments/repro.py --report=True --results_dir=experiments/results   # the first, val-split version

It prepares its data if missing (prepare_data.py --dataset=shakespeare --tokenizer=bpe:512, downloading the text
unless --input names a copy) and works from any directory: train.py, eval.py, the configs
(config/shakespeare_ponder.py, then experiments/repro_shakespeare.py), the data (data/shakespeare-bpe512) and
out_root (out-repro) are found in the repository. Each run is `python train.py config/shakespeare_ponder.py
experiments/repro_shakespeare.py <its overrides> --seed=S --out_dir=<out_root>/<name>-s<S>` with OMP_NUM_THREADS=1
(two single-threaded runs share two cores better than one run with two threads), then eval.py on its checkpoint;
logs in the run's folder. A run whose train_time.json exists is finished and reused (delete its folder to train it
again), and a run whose result file exists is skipped. Each evaluated run writes its small result file as soon as
it is evaluated, results_dir/<name>-s<S>.json (the final val and test
losses, the splits' sizes, the val-loss curve, the costs, the config); the table (results.md) and the plots
val_loss_tokens.png, val_loss_flops.png and val_loss_inference_flops.png are rebuilt from every result file there,
so a set of runs can be continued on another machine, or in another sitting, from the committed files. The files of
one results_dir must share one val split (results made before there were test splits used the whole held-out
tenth: keep new runs in another --results_dir until they are all made again).
"""
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)  # run as a script, this file's folder is on the path, not the repository's modules
from model import GPT  # noqa: E402
from nanoponder.checkpoint import Checkpoint  # noqa: E402
from nanoponder.cost import (cpu_name, flops_per_token, inference_flops_per_token,  # noqa: E402
                              kv_cache_bytes_per_token)
from nanoponder.data import read_meta, read_tokens  # noqa: E402
from nanoponder.methods import method_fields  # noqa: E402
from nanoponder.runlog import read_metrics  # noqa: E402
from nanoponder.prerun import MAX_SEED  # noqa: E402
from nanoponder.runtime import UserError, atomic_write, check_output_dir, failure, one_line, run_cli  # noqa: E402

# the runs: name -> (method, extra train.py overrides, what sets it apart from its method's label),
# most expensive first so two workers finish together. vanilla-flops gets its iterations from flops_matched_iters.
RUNS = {
    'ponderlm2-k2': ('ponderlm2-k2', [], ''),
    'vanilla-flops': ('vanilla', [], 'training FLOPs of K=1'),
    'ponderlm2-k1': ('ponderlm2-k1', [], ''),
    'ponderlm2-k1-g2': ('ponderlm2-k1', ['--jacobi_grad_passes=2'], 'backward through the last 2 passes'),
    'ponderlm2-k1-g1': ('ponderlm2-k1', ['--jacobi_grad_passes=1'], 'backward through the last pass'),
    'ponderlm2-k1-td': ('ponderlm2-k1', ['--thought_dropout=0.3'], 'thought dropout 0.3'),
    'ponderlm1-n3': ('ponderlm1-n3', [], ''),
    'pause-k1': ('pause-k1', ['--vocab_size=520', '--pause_token_id=519'], ''),  # a free embedding row for the pause
    'loop-k1': ('loop-k1', [], ''),
    'hidden-n1': ('hidden-n1', [], ''),
    'hidden-scale': ('hidden-n1', ['--embed_scale_rule=sqrt2.5H'], "K=1's embedding scale"),
    'vanilla-2x': ('vanilla', ['--n_layer=12'], '2x non-embedding params'),
    'vanilla-scale': ('vanilla', ['--embed_scale_rule=sqrt2.5H', '--init_shrink_passes=2'],
                      "K=1's embedding scale and init"),
    'vanilla': ('vanilla', [], ''),
}
TRAIN = os.path.join(ROOT, 'train.py')
EVAL = os.path.join(ROOT, 'eval.py')
BASE_CONFIG = os.path.join(ROOT, 'config', 'shakespeare_ponder.py')  # the data, the trunk, the batch, the optimizer
# -----------------------------------------------------------------------------
config = os.path.join(ROOT, 'experiments', 'repro_shakespeare.py')  # the budget and the method, over BASE_CONFIG
data_dir = os.path.join(ROOT, 'data', 'shakespeare-bpe512')
input = ''              # a local copy of Tiny Shakespeare, to prepare the data offline
out_root = os.path.join(ROOT, 'out-repro')  # the run folders: checkpoints and logs
results_dir = os.path.join(ROOT, 'experiments', 'results_v2')  # a small file per finished run, the table, the plots
family = os.path.join(ROOT, 'experiments', 'family.json')  # the pre-registered comparisons the report tests
runs = ','.join(RUNS)
seeds = '1337,1338,1339'
jobs = 2
max_iters = 0           # 0 -> the config's
train_args = ''         # more train.py overrides for every run, space-separated (the tests' toy budget)
trained_only = False    # evaluate the runs of runs x seeds that are already trained; train nothing
report = False          # rebuild the table and plots from the files in results_dir alone; train and evaluate nothing
# -----------------------------------------------------------------------------


def run_overrides(name):
    """train.py overrides of one run, beyond the config file and train_args."""
    method, extra, _ = RUNS[name]
    args = [f'--{key}={value}' for key, value in method_fields(method).items()] + extra
    if max_iters:
        args.append(f'--max_iters={max_iters}')
    if name == 'vanilla-flops':  # more iterations, evaluated as often relative to its length
        settings = run_settings(args)
        iters = flops_matched_iters(settings['max_iters'])
        eval_every = max(1, round(settings['eval_interval'] * iters / settings['max_iters']))
        args += [f'--max_iters={iters}', f'--eval_interval={eval_every}']
    return args


def run_settings(args):
    """train.py's config for the config files, train_args and args, by configurator.py's rules."""
    import train
    from configurator import apply_overrides
    settings = train.config_dict()  # its defaults: this process never runs train.py's configurator
    apply_overrides([*config_files(), *train_args.split(), *args], settings)
    return settings


def training_flops_per_token(args):
    """FLOPs per token of one training step of the model args give (the mean over the R drawn)."""
    from nanoponder.prerun import scratch_config
    cfg = SimpleNamespace(**run_settings(args))
    return flops_per_token(scratch_config(cfg), tuple(cfg.jacobi_train_range), training=True,
                           grad_passes=cfg.jacobi_grad_passes)


def flops_matched_iters(base_iters):
    """Iterations of vanilla that cost the training FLOPs of base_iters iterations of PonderLM-2 K=1."""
    k1 = training_flops_per_token([f'--{k}={v}' for k, v in method_fields('ponderlm2-k1').items()])
    vanilla = training_flops_per_token([f'--{k}={v}' for k, v in method_fields('vanilla').items()])
    return round(base_iters * k1 / vanilla)


def config_files():
    """The config files of every run, in the order train.py applies them."""
    return [BASE_CONFIG, os.path.abspath(config)]


def train_command(name, seed, out_dir):
    return [sys.executable, TRAIN, *config_files(), *train_args.split(), *run_overrides(name),
            f'--data_dir={os.path.abspath(data_dir)}', f'--out_dir={out_dir}', f'--seed={seed}',
            f'--wandb_run_name=repro-{name}-s{seed}',
            '--overwrite=True']  # what a folder without train_time.json holds is an unfinished run: start over


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
        raise failure(f"train.py of run {name} seed {seed} failed (exit {r.returncode}): "
                      f"{last_error(os.path.join(out_dir, 'train.log'))}; see {out_dir}/train.log")
    seconds = time.time() - t0
    with atomic_write(done, 'w') as f:
        json.dump({'seconds': seconds}, f)
    print(f"{name} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return out_dir, seconds


def last_error(log):
    """A failed script's own `error:` line from its log, or its last line."""
    with open(log, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()] or ['(nothing written)']
    return next((line for line in reversed(lines) if line.startswith('error:')), lines[-1])


def eval_losses(out_dir, split='val', checkpoint='ckpt.pt'):
    """The run's loss over the whole split, by eval.py: Jacobi thoughts at R=3 (the papers' number) and, for thought
    models, exact thoughts (one token at a time through the KV cache, as decoding computes them)."""
    return losses_of(eval_rows(out_dir, split, checkpoint))


def losses_of(rows):
    """eval.py's rows -> (the loss at R=3, or the one row's without thoughts; the exact thoughts' loss or None)."""
    loss = {row['name']: row['loss'] for row in rows}
    if 'exact' not in loss:  # no thoughts: one row
        return next(iter(loss.values())), None
    return loss['R=3'], loss['exact']


def eval_rows(out_dir, split='val', checkpoint='ckpt.pt'):
    """eval.py's rows of the run over the whole split (R = 0..3, and exact thoughts). Its eval json is reused while
    it is newer than the checkpoint and the split's token file (data prepared again: evaluated again). checkpoint:
    best.pt scores the run's best val checkpoint instead (eval_<split>_best)."""
    out = os.path.join(out_dir, ('eval' if split == 'val' else f'eval_{split}') + ('_best' if checkpoint == 'best.pt'
                                                                                    else ''))
    inputs = (os.path.join(out_dir, checkpoint), os.path.join(data_dir, f'{split}.bin'))
    if not os.path.exists(out + '.json') or os.path.getmtime(out + '.json') < max(map(os.path.getmtime, inputs)):
        run_eval(os.path.join(out_dir, checkpoint), out, split)
    with open(out + '.json') as f:
        return json.load(f)['rows']


def run_eval(ckpt, out, split):
    cmd = [sys.executable, EVAL, f'--init_from={ckpt}', '--max_jacobi=3', '--jacobi_tols=()',
           f'--out={out}', '--dtype=float32', '--batch_size=32', f'--split={split}']
    log_path = out + '.log'  # eval.log, eval_test.log: one per split
    with open(log_path, 'w') as log:
        r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode != 0:
        raise failure(f"eval.py of {ckpt} failed (exit {r.returncode}): {last_error(log_path)}; see {log_path}")


def val_curve(out_dir):
    """(tokens, val loss) at each evaluation of the run (train.py's periodic val loss on the first val blocks)."""
    entries = read_metrics(os.path.join(out_dir, 'metrics.jsonl'))
    return [(e['tokens'], e['val_loss']) for e in entries if 'val_loss' in e]


def evaluate(name, seed, out_dir, seconds):
    """One run's results, from its checkpoint, its log and eval.py."""
    ckpt = Checkpoint.load(os.path.join(out_dir, 'ckpt.pt'))
    cfg = ckpt.gpt_config()
    with torch.device('meta'):  # the shapes alone: no weights to allocate
        shapes = GPT(cfg)
    R = tuple(ckpt.config.get('jacobi_train_range', (2, 4)))  # the R the run drew, on average
    flops = flops_per_token(cfg, R, training=True, grad_passes=ckpt.config.get('jacobi_grad_passes', 0))
    params = shapes.get_num_params()
    note = RUNS[name][2]
    jacobi, exact = eval_losses(out_dir)
    test_rows = eval_rows(out_dir, 'test')  # held out from every choice made on val
    test_loss, test_loss_exact = losses_of(test_rows)
    passes = [{k: row.get(k) for k in ('passes', 'loss', 'change', 'distance_to_exact')}  # the thoughts'
              for row in test_rows if row['thoughts'] == 'jacobi']                         # convergence per pass
    # a run that overfits (the FLOPs-matched vanilla): also its best val checkpoint, scored on test
    best = eval_losses(out_dir, 'test', 'best.pt')[0] if name == 'vanilla-flops' else None
    counts = read_meta(data_dir)['tokens']  # which val and test splits the losses are of
    tokens = ckpt.iter_num * ckpt.config['batch_size'] * ckpt.config['gradient_accumulation_steps'] * cfg.block_size
    return dict(name=name, label=cfg.method_label + (f", {note}" if note else ''), method=cfg.method, seed=seed,
                jacobi=jacobi, exact=exact, test_loss=test_loss, test_loss_exact=test_loss_exact, test_loss_best=best,
                val_tokens=counts['val'], test_tokens=counts['test'], test_jacobi_passes=passes, seconds=seconds,
                params=params, iters=ckpt.iter_num, tokens=tokens,
                train_flops=tokens * flops, flops_per_token=flops,
                inference_flops_per_token=inference_flops_per_token(cfg),
                kv_bytes_per_token=kv_cache_bytes_per_token(cfg, 2),  # bf16 keys and values
                curve=val_curve(out_dir), config=ckpt.config, model_args=ckpt.model_args,
                commit=git_commit(), machine=f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")


def git_commit():
    """The repository's commit, for the record (None outside a git checkout)."""
    r = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def save_result(result):
    """The run's small result file, results_dir/<name>-s<seed>.json: what the table and plots are built from when
    the run folders are gone (commit it)."""
    os.makedirs(results_dir, exist_ok=True)
    with atomic_write(os.path.join(results_dir, f"{result['name']}-s{result['seed']}.json"), 'w') as f:
        json.dump(result, f, indent=1)


# what the report reads of a result file: key -> the kinds its value may be
NUMBER = (int, float)
RESULT_KEYS = {'name': str, 'seed': int, 'config': dict, 'label': str, 'params': NUMBER, 'tokens': NUMBER,
               'train_flops': NUMBER, 'flops_per_token': NUMBER, 'inference_flops_per_token': NUMBER,
               'kv_bytes_per_token': NUMBER, 'jacobi': NUMBER, 'exact': (*NUMBER, type(None)), 'seconds': NUMBER,
               'curve': list}


def is_curve(curve):
    """[[tokens, val loss], ...]: at least one pair of numbers."""
    return curve and all(isinstance(p, list) and len(p) == 2 and all(
        isinstance(v, NUMBER) and not isinstance(v, bool) for v in p) for p in curve)


def read_result(path, keys=tuple(RESULT_KEYS)):
    """One result file, checked to hold these keys, each of its kind (RESULT_KEYS: every key the report reads); or
    a UserError naming it."""
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:  # not JSON, a directory, unreadable
        raise UserError(f"{path} is no repro.py result file ({one_line(e)}): delete it, or restore it "
                        f"(git checkout)") from None
    wrong = [k for k in keys
             if not isinstance(r, dict) or not isinstance(r.get(k), RESULT_KEYS[k]) or isinstance(r.get(k), bool)
             or k == 'curve' and not is_curve(r[k])]
    if wrong:
        raise UserError(f"{path} is no repro.py result file (missing or mistyped: {', '.join(wrong)}): delete it, or "
                        f"restore it (git checkout)")
    return r


def load_results(some=True):
    """Every run's result file in results_dir, in RUNS then seed order (the files of runs RUNS no longer names are
    skipped, with a line), checked to compare: one val split, each run's seeds evaluated at the same points. some:
    none is an error."""
    results = []
    names = sorted(f for f in os.listdir(results_dir) if f.endswith('.json')) if os.path.isdir(results_dir) else []
    for f in names:
        r = read_result(os.path.join(results_dir, f))
        if r['name'] not in RUNS:
            print(f"skipping {f}: run {r['name']!r} is not one of {', '.join(RUNS)}")
            continue
        results.append(r)
    if not results and some:
        raise UserError(f"no result files in {results_dir}: train some runs first (python experiments/repro.py)")
    check_one_val_split(results)
    for name, runs_ in by_run(results).items():
        if len({tuple(tokens for tokens, _ in r['curve']) for r in runs_}) > 1:
            raise UserError(f"the result files of run {name} in {results_dir} hold val curves at different points "
                            f"(seeds {', '.join(str(r['seed']) for r in runs_)}): their seeds cannot be averaged; "
                            f"restore them (git checkout) or train them again")
    return sorted(results, key=lambda r: (list(RUNS).index(r['name']), r['seed']))


def check_one_val_split(results, val_tokens=None):
    """The results (and the runs about to be made on a val split of val_tokens) must share one val split: its
    token count, none recorded for files made before there were test splits (the whole held-out tenth)."""
    splits = {r.get('val_tokens') for r in results} | ({val_tokens} if val_tokens is not None else set())
    if len(splits) > 1:
        said = sorted(f"a val split of {n:,} tokens" if n else "the whole held-out tenth (before test splits)"
                      for n in splits)
        raise UserError(f"{results_dir} would hold results on {' and on '.join(said)}: their losses do not compare; "
                        f"keep each in its own --results_dir (and --out_root)")


BUDGET = ('max_iters', 'batch_size', 'block_size', 'gradient_accumulation_steps', 'learning_rate')


def check_results_dir(tasks):
    """Before any work: a run whose result file results_dir already holds must have that file's budget, else the
    file would be replaced and the report would mix budgets (a quick look with --max_iters=100 next to the
    committed 600-iteration runs): such a run belongs in another --results_dir (and --out_root)."""
    for name, seed in tasks:
        path = os.path.join(results_dir, f'{name}-s{seed}.json')
        if not os.path.exists(path):
            continue
        had, now = read_result(path, ('name', 'seed', 'config'))['config'], run_settings(run_overrides(name))
        differ = [f"{key} {had.get(key)} there, {now.get(key)} here" for key in BUDGET if had.get(key) != now.get(key)]
        if differ:
            raise UserError(f"{path} holds run {name} seed {seed} with another budget ({'; '.join(differ)}): pass "
                            f"another --results_dir and --out_root for these runs")


def by_run(results):
    """name -> that run's results over the seeds, in RUNS order."""
    return {name: [r for r in results if r['name'] == name] for name in RUNS if any(r['name'] == name for r in results)}


# (color, line style) per run, the same in every plot: a variant or a control in its base run's color, dashed
STYLE = {
    'ponderlm2-k2': ('#08306b', '-'), 'vanilla-flops': ('#7f7f7f', '-'), 'ponderlm2-k1': ('#1f77b4', '-'),
    'ponderlm2-k1-g2': ('#17becf', ':'), 'ponderlm2-k1-g1': ('#17becf', '--'), 'ponderlm2-k1-td': ('#1f77b4', '-.'),
    'ponderlm1-n3': ('#9467bd', '-'), 'pause-k1': ('#e377c2', '-'), 'loop-k1': ('#ff7f0e', '-'),
    'hidden-n1': ('#8c564b', '-'), 'hidden-scale': ('#8c564b', '--'), 'vanilla-2x': ('#2ca02c', '-'),
    'vanilla-scale': ('#d62728', '--'), 'vanilla': ('#d62728', '-'),
}


@contextmanager
def figure(files, name, panels=1, size=(7, 4.5)):
    """The axes of one figure (a list of them for panels > 1), put in files[name] as a PNG's bytes once the block
    has drawn it."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, panels, figsize=size)
    try:
        yield ax
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format='png', dpi=120, bbox_inches='tight')
        files[name] = png.getvalue()
    finally:
        plt.close(fig)


def plot(results, files, name, x_of, xlabel, leave_out=(), zoom=False):
    """Val-loss curves against x_of(tokens, run): each run's mean over the seeds, with the min-max band; the legend
    beside the axes. zoom: a second panel, the last third of training with the y-axis on the runs' final losses."""
    results = [r for r in results if r['name'] not in leave_out]
    log_x = 'FLOPs' in xlabel
    with figure(files, name, panels=2 if zoom else 1, size=(12, 4.5) if zoom else (9, 4.5)) as axes:
        axes = list(axes) if zoom else [axes]
        for i, ax in enumerate(axes):
            ends = []
            for run, runs_ in by_run(results).items():
                first = 1 if log_x else 2 * len(runs_[0]['curve']) // 3 if i else 0  # iteration 0: no FLOPs for a log x
                xs = [x_of(tokens, runs_[0]) for tokens, _ in runs_[0]['curve'][first:]]
                losses = np.array([[loss for _, loss in r['curve'][first:]] for r in runs_])  # (seeds, evals)
                label = f"{runs_[0]['label']} ({len(runs_)} seed{'s' * (len(runs_) > 1)})"
                color, style = STYLE[run]
                ax.plot(xs, losses.mean(0), label=label, color=color, ls=style, lw=1.2)
                if len(runs_) > 1 and not i:
                    ax.fill_between(xs, losses.min(0), losses.max(0), color=color, alpha=0.12)
                ends.append(losses.mean(0)[-1])
            if i:  # the zoom: the final losses of the runs within 0.2 nats of the best, a little room around
                near = [e for e in ends if e < min(ends) + 0.2]
                ax.set_ylim(min(near) - 0.03, max(near) + 0.12)
                ax.set_title('the last third of training, zoomed (seed means)', fontsize=9)
            else:
                settled = [loss for r in results for _, loss in r['curve'][len(r['curve']) // 4:]]
                if settled:
                    ax.set_ylim(min(settled) - 0.05, max(settled) + 0.1)
                ax.set_title('Tiny Shakespeare, 512-id BPE, 6x128 trunk: seed mean, min-max band', fontsize=9)
            ax.set_xscale('log' if log_x else 'linear')
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("val loss (train.py's periodic evaluation, R=3)")
        axes[-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def spread(values, fmt):
    """'mean (min-max)' over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def paired(results, name, base, key='jacobi'):
    """[(seed, run's loss - base's)] over the seeds both have (key: the val loss (Jacobi) by default): a seed fixes
    the init and the data order of both runs, so their difference is what the seeds' spread is about."""
    of = {r['seed']: r[key] for r in results if r['name'] == base}
    return [(r['seed'], r[key] - of[r['seed']]) for r in results if r['name'] == name and r['seed'] in of]


TRUNCATED = ('ponderlm2-k1', 'ponderlm2-k1-g2', 'ponderlm2-k1-g1', 'loop-k1', 'vanilla')  # the truncation table's


def truncation_table(results):
    """PonderLM-2 K=1 trained with backpropagation through its last G passes only, beside full K=1, Loop and
    vanilla, on the test split: the loss, the exact-vs-Jacobi gap (the guard rail: do the Jacobi passes still
    converge to the thoughts the model learned?), the cost, and the thoughts' change per Jacobi pass."""
    groups = {n: rs for n, rs in by_run(results).items() if n in TRUNCATED and all('test_loss' in r for r in rs)}
    if not any(n.startswith('ponderlm2-k1-g') for n in groups):
        return []
    lines = ['| run | seeds | test loss (Jacobi R=3) | exact - Jacobi | - PonderLM-2 K=1, per seed | training FLOPs '
             '| train time (min) | change per pass, R=1, 2, 3 |', '|---|---|---|---|---|---|---|---|']
    for name, rs in groups.items():
        gap = spread([r['test_loss_exact'] - r['test_loss'] for r in rs], '{:+.5f}') \
            if rs[0]['test_loss_exact'] is not None else '-'
        diffs = ', '.join(f"{d:+.4f}" for _, d in paired(results, name, 'ponderlm2-k1', 'test_loss')) \
            if name != 'ponderlm2-k1' else ''
        change = ', '.join(f"{np.mean([r['test_jacobi_passes'][p]['change'] for r in rs]):.1e}" for p in (1, 2, 3)) \
            if rs[0].get('test_jacobi_passes') else '-'
        lines.append(f"| {rs[0]['label']} | {len(rs)} | {spread([r['test_loss'] for r in rs], '{:.4f}')} | {gap} "
                     f"| {diffs} | {rs[0]['train_flops']:.2e} | {spread([r['seconds'] / 60 for r in rs], '{:.1f}')} "
                     f"| {change} |")
    return ['', 'Truncated backpropagation (jacobi_grad_passes), on the whole test split:', '', *lines]


def table(results):
    """A row per run: its costs, the final losses (val; and test, where the result files have it), mean (min-max)
    over the seeds, and the paired differences to K=1 per seed on the loss the comparisons read (loss_key)."""
    key = loss_key(results)
    test = key == 'test_loss'
    lines = ['| run | seeds | non-emb params | tokens | training FLOPs | inference FLOPs / token | KV cache / token '
             '| val loss (Jacobi R=3) | val loss (exact) |' + (' test loss (Jacobi R=3) | test loss (exact) |' if test
                                                                else '')
             + f" - PonderLM-2 K=1 ({'test' if test else 'val'}), per seed | train time (min) |",
             '|---' * (13 if test else 11) + '|']

    def losses(runs_, jacobi, exact):
        return (f"{spread([r[jacobi] for r in runs_], '{:.4f}')} | "
                + (spread([r[exact] for r in runs_], '{:.4f}') if runs_[0][exact] is not None else '-'))
    for name, runs_ in by_run(results).items():
        r0 = runs_[0]
        diffs = ', '.join(f"{d:+.3f}" for _, d in paired(results, name, 'ponderlm2-k1', key)
                          if name != 'ponderlm2-k1')
        lines.append(f"| {r0['label']} | {len(runs_)} | {r0['params'] / 1e6:.2f}M | {r0['tokens'] / 1e6:.2f}M "
                     f"| {r0['train_flops']:.2e} | {r0['inference_flops_per_token'] / 1e6:.1f}M "
                     f"| {r0['kv_bytes_per_token'] / 1024:.0f} KiB | {losses(runs_, 'jacobi', 'exact')} | "
                     + (f"{losses(runs_, 'test_loss', 'test_loss_exact')} | " if test else '')
                     + f"{diffs} | {spread([r['seconds'] / 60 for r in runs_], '{:.1f}')} |")
    return '\n'.join(lines)


def loss_key(results):
    """Which loss the comparisons read: the test split's where every result file has it, else (files made before
    there were test splits) the val split's."""
    return 'test_loss' if all(r.get('test_loss') is not None for r in results) else 'jacobi'


def paired_differences(results, bases=('ponderlm2-k1', 'vanilla')):
    """Every run's paired differences against each base, exploratory: per seed, their mean, the 95% t-interval,
    the two-sided paired-t p unadjusted, Holm's over the comparisons listed (for reference: the pre-registered
    family is in verdicts) and the sign-flip p; a pair listed once (vanilla - K=1, not K=1 - vanilla too); the
    FLOPs-matched vanilla at its best val checkpoint too, where it has one."""
    from nanoponder.stats import holm, p_text, paired_test  # scipy: a dependency of the report only
    key, label = loss_key(results), {r['name']: r['label'] for r in results}
    listed = []  # (run, base, the run's label, its differences per seed)
    for base in bases:
        for name in by_run(results):
            diffs = [d for _, d in paired(results, name, base, key)]
            if name == base or not diffs or (base, name) in [(n, b) for n, b, *_ in listed]:
                continue
            listed.append((name, base, label[name], diffs))
            if name == 'vanilla-flops' and key == 'test_loss' and base == 'ponderlm2-k1':
                of = {r['seed']: r['test_loss'] for r in results if r['name'] == base}
                best = [r['test_loss_best'] - of[r['seed']] for r in results if r['name'] == name
                        and r['seed'] in of and r.get('test_loss_best') is not None]
                if best:
                    listed.append((name, base, f"{label[name]}, its best val checkpoint", best))
    tests = [paired_test(diffs) if len(diffs) > 1 else None for *_, diffs in listed]
    adjusted = iter(holm([t['p'] for t in tests if t]))
    lines = []
    for (name, base, title, diffs), c in zip(listed, tests):
        line = f"{title} - {label[base]}: mean {np.mean(diffs):+.4f} (per seed " \
               f"{', '.join(f'{d:+.4f}' for d in diffs)})"
        if c:
            line += (f", 95% CI [{c['low']:+.4f}, {c['high']:+.4f}], p {p_text(c['p'])} unadjusted, Holm "
                     f"{p_text(next(adjusted))} over the {sum(t is not None for t in tests)} listed, sign-flip "
                     f"{p_text(c['p_sign_flip'])}")
        lines.append(line)
    return lines


def read_family():
    """The pre-registered confirmatory comparisons (family.json), checked."""
    try:
        with open(family) as f:
            fam = json.load(f)
        for c in fam['comparisons']:
            if c['run'] not in RUNS or c['base'] not in RUNS or c['test'] not in ('two-sided', 'non-inferiority'):
                raise ValueError(f"comparison {c.get('id')}: unknown run, base or test")
        float(fam['margin']), float(fam['alpha']), float(fam['suggestive']), list(fam['seeds'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{family} is no family of comparisons ({one_line(e)}): restore it (git checkout)") from None
    return fam


def verdicts(results):
    """The confirmatory family on the test split: per comparison its seeds, the mean difference, its 95%
    t-interval, the paired-t p, Holm's adjusted p over the comparisons that have seeds, the sign-flip p, the words
    the adjusted p earns, and the smallest difference the design detects. Empty when the results have no test
    losses (made before test splits)."""
    if loss_key(results) != 'test_loss':
        return []
    from nanoponder.stats import detectable, holm, p_text, paired_test, verdict
    fam = read_family()
    seeds = set(fam['seeds'])
    rows = []
    for c in fam['comparisons']:
        diffs = [d for s, d in paired(results, c['run'], c['base'], 'test_loss') if s in seeds]
        rows.append((c, paired_test(diffs, c['test'], fam['margin']) if len(diffs) > 1 else None, len(diffs)))
    # Holm over the whole family, a comparison without a test counting p = 1: interim p-values are never lower
    # than the pre-registered family of eight would give
    adjusted = iter(holm([t['p'] if t else 1.0 for _, t, _ in rows]))
    lines = ['| id | run - base | seeds | mean | 95% CI | p | Holm p | sign-flip p | verdict | detects |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for c, t, n in rows:
        what = f"{c['run']} - {c['base']}" + (f" (non-inferiority, margin {fam['margin']})"
                                              if c['test'] == 'non-inferiority' else '')
        p_adj = next(adjusted)
        if not t:
            lines.append(f"| {c['id']} | {what} | {n} | - | - | - | - | - | "
                         f"{'not yet run' if n == 0 else f'{n} seed: no test'} | - |")
            continue
        words = verdict(p_adj, c['test'], fam['alpha'], fam['suggestive'])
        interim = '' if n >= len(seeds) else f" (interim: {n} of {len(seeds)} seeds)"
        lines.append(f"| {c['id']} | {what} | {n} | {t['mean']:+.4f} | [{t['low']:+.4f}, {t['high']:+.4f}] "
                     f"| {p_text(t['p'])} | {p_text(p_adj)} | {p_text(t['p_sign_flip'])} | {words}{interim} "
                     f"| {detectable(t['sd'], n, fam['alpha'] / len(fam['comparisons']), test=c['test']):.4f} |")
    return ['', 'The pre-registered comparisons (experiments/family.json), on the whole test split (Jacobi R=3 for '
                'thought models): run - base per seed, the 95% t-interval unadjusted, Holm over the family; '
                '"detects": the smallest difference found with 80% power at the Holm-worst level:', '', *lines]


def label_heights(ys, gap):
    """Heights (axes fraction, 0-1) for labels of points at heights ys, in the same order: each as near its point as
    can be while every two are at least gap apart, all within 0-1 where n * gap <= 1."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = []
    for i in order:  # up from the bottom: each at its point or just above the one below
        placed.append(max(ys[i], placed[-1] + gap) if placed else max(ys[i], 0.0))
    for j in range(len(placed) - 1, -1, -1):  # then down from the top: none above 1
        placed[j] = min(placed[j], 1.0 if j == len(placed) - 1 else placed[j + 1] - gap)
    heights = [0.0] * len(ys)
    for i, y in zip(order, placed):
        heights[i] = min(max(y, 0.0), 1.0)  # (rounding only: 1 - n * gap may fall a hair below 0)
    return heights


def plot_inference(results, files, name):
    """Final loss (whole test split where the result files have it, else val; Jacobi R=3) against inference FLOPs
    per token: a point per run at the mean over its seeds, with the 95% t-interval of that mean (3 or more seeds;
    none for fewer), the labels in a column beside the axes, apart, each joined to its point; the y-axis on the
    methods: a run far above them (the overfit FLOPs-matched vanilla) is an arrow at the top edge with its value.
    Runs within 1% of one x (Loop, Hidden, 2x depth) are set side by side, 2% apart, lowest loss left. The plot to read first."""
    from scipy import stats as scipy_stats
    key = loss_key(results)
    points = []  # (x, mean, half-width of the interval, label, run)
    for run, runs_ in by_run(results).items():
        losses = np.array([r[key] for r in runs_])
        half = scipy_stats.t.ppf(0.975, len(losses) - 1) * losses.std(ddof=1) / np.sqrt(len(losses)) \
            if len(losses) > 2 else 0.0
        points.append((runs_[0]['inference_flops_per_token'], losses.mean(), half,
                       f"{runs_[0]['label']} ({len(runs_)})", run))
    means = sorted(p[1] for p in points)
    core = [m for m in means if m <= np.median(means) + 4 * max(np.median(means) - means[0], 0.02)]
    top = max(m + h for _, m, h, *_ in points if m in core) + 0.01
    bottom = min(m - h for _, m, h, *_ in points if m in core) - 0.01
    with figure(files, name, size=(9, 4.5)) as ax:
        seen, drawn = {}, []  # drawn: (x, y at the point, the label's text, its color)
        for x, mean, half, label, run in sorted(points, key=lambda p: p[1]):
            near = [p[0] for p in points if abs(p[0] / x - 1) < 0.01]  # the runs at about x: Pause's vocab is 520
            seen[min(near)] = seen.get(min(near), -1) + 1
            x = np.exp(np.mean(np.log(near))) * 1.02 ** (seen[min(near)] - (len(near) - 1) / 2)  # centred on them
            color = STYLE[run][0]
            if mean > top:  # off the axis: an arrow at the top edge, its value in the label
                ax.annotate('', xy=(x, top), xytext=(x, top - (top - bottom) / 8),
                            arrowprops=dict(arrowstyle='->', color=color))
                drawn.append((x, top, f"{label}: {mean:.3f}, above the axis", color))
                continue
            ax.errorbar([x], [mean], yerr=[[half], [half]] if half else None, fmt='o' if STYLE[run][1] == '-'
                        else 's', color=color, capsize=3, ms=5)
            drawn.append((x, mean, label, color))
        ax.set_ylim(bottom, top)
        heights = label_heights([(y - bottom) / (top - bottom) for _, y, _, _ in drawn], gap=1 / max(len(drawn), 22))
        for (x, y, label, color), h in zip(drawn, heights):
            ax.annotate(label, xy=(x, y), xytext=(1.03, h), textcoords='axes fraction', fontsize=7, va='center',
                        color=color, annotation_clip=False,
                        arrowprops=dict(arrowstyle='-', color=color, lw=0.5, alpha=0.35))
        ax.set_xscale('log')
        lo, hi = min(p[0] for p in points), max(p[0] for p in points)
        ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.set_xlabel('inference FLOPs per token (exact decoding through the KV cache)')
        split = 'test' if key == 'test_loss' else 'val'
        ax.set_ylabel(f'final {split} loss (whole {split} split, R=3)')
        ax.set_title('Tiny Shakespeare, 512-id BPE, 6x128 trunk: mean and 95% interval over seeds', fontsize=9)
        ax.grid(alpha=0.3, which='both')


def chosen_runs():
    asked = [n.strip() for n in runs.split(',') if n.strip()]
    unknown = [n for n in asked if n not in RUNS]
    if unknown or not asked:
        raise UserError(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    return [n for n in RUNS if n in asked]


def chosen_seeds():
    try:
        chosen = [int(s) for s in str(seeds).split(',')]
    except ValueError:
        raise UserError(f"seeds must be integers separated by commas, got {seeds!r}") from None
    twice = sorted({s for s in chosen if chosen.count(s) > 1})
    if twice:  # two runs of one seed would train into one out_dir at once
        raise UserError(f"seeds lists {', '.join(map(str, twice))} more than once: each seed is one run")
    for s in chosen:
        if not 0 <= s <= MAX_SEED:
            raise UserError(f"seed {s} is out of train.py's range [0, {MAX_SEED:,}]")
    return chosen


def prepare_data():
    """Tiny Shakespeare with a 512-id BPE of its train split, unless data_dir already holds prepared data
    (check_inputs checks that it is this; prepare_data.py refuses to replace other data)."""
    if os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return
    cmd = [sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--dataset=shakespeare', '--tokenizer=bpe:512',
           f'--out_dir={os.path.abspath(data_dir)}'] + ([f'--input={os.path.abspath(input)}'] if input else [])
    print(f"preparing {data_dir}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise failure("could not prepare the data (see the error above)")


def check_inputs():
    if jobs < 1:
        raise UserError(f"jobs must be >= 1, got {jobs}")
    check_output_dir(out_root, '--out_root')  # before hours of training: where the runs and their results go
    check_output_dir(results_dir, '--results_dir')
    if not os.path.isfile(config):
        raise UserError(f"config file not found: {config}")
    prepare_data()
    made_with = read_meta(data_dir).get('tokenizer')
    if made_with != 'bpe:512':  # data prepared for something else: the runs would not be this experiment's
        raise UserError(f"{data_dir} holds data of tokenizer {made_with}, not the experiment's bpe:512: pass another "
                        f"--data_dir (repro.py prepares it there)")
    for split in ('train', 'val', 'test'):  # whole, and a test split (which every result file records)
        read_tokens(data_dir, split)


def write_report():
    """The table (results.md) and the three plots, rebuilt from the result files in results_dir alone; every file
    is checked, and results_dir found writable, before anything is printed or written."""
    results = load_results()
    check_output_dir(results_dir, '--results_dir')
    pairs = [f'- {line}' for line in paired_differences(results)]
    split = 'test' if loss_key(results) == 'test_loss' else 'val'
    md = '\n'.join([table(results), *verdicts(results), '',
                    f'Paired differences of the {split} loss (Jacobi R=3, whole {split} split), per seed, exploratory:',
                    '', *pairs, *truncation_table(results)])
    files = {'results.md': (md + '\n').encode()}  # name -> its bytes: all built before any is written
    plot(results, files, 'val_loss_tokens.png', lambda tokens, r: tokens / 1e6,
         'tokens trained (M)', leave_out=('vanilla-flops',), zoom=True)  # 10x the tokens: it is the FLOPs plot's comparison
    plot(results, files, 'val_loss_flops.png', lambda tokens, r: tokens * r['flops_per_token'], 'training FLOPs')
    plot_inference(results, files, 'val_loss_inference_flops.png')
    print(md)
    for name, data in files.items():
        with atomic_write(os.path.join(results_dir, name)) as f:
            f.write(data)
    print(f"wrote {results_dir}/results.md, val_loss_tokens.png, val_loss_flops.png, val_loss_inference_flops.png "
          f"from {len(results)} result files")


def main():
    if report:
        return write_report()
    names, seed_list = chosen_runs(), chosen_seeds()
    tasks = [(n, s) for s in seed_list for n in names]
    check_results_dir(tasks)
    check_inputs()
    check_one_val_split(load_results(some=False), read_meta(data_dir)['tokens']['val'])
    if trained_only:
        tasks = [(n, s) for n, s in tasks if os.path.exists(os.path.join(out_root, f'{n}-s{s}', 'train_time.json'))]
        if not tasks:
            raise UserError(f"trained_only=True but no run of {runs} x seeds {seeds} is trained in {out_root}")
    done = [(n, s) for n, s in tasks if os.path.exists(os.path.join(results_dir, f'{n}-s{s}.json'))]
    for name, seed in done:  # (check_results_dir found it of this budget)
        print(f"{name} seed {seed}: its result file is in {results_dir}, skipping it (delete it to run it again)")
    t0 = time.time()

    def run(task):  # each run's result file as soon as it is evaluated: commit them as they come
        save_result(evaluate(*task, *train(*task)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the training subprocesses
        list(pool.map(run, [task for task in tasks if task not in done]))
    write_report()
    print(f"total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    run_cli(main)
