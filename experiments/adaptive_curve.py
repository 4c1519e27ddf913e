"""
Adaptive thoughts, measured (docs/experiments.md): the loss against inference FLOPs per token of PonderLM-2 runs of
experiments/repro.py decoding with a sweep of think_threshold τ (eval.py --think_thresholds on the whole test split,
token by token through the KV cache, as decoding runs), with other runs (vanilla, 2x depth) as points; where each
curve reaches each point's loss; the FLOPs the measured skip shares would give at the Pythia shapes; and what one
cached decoding pass costs by the number of rows it runs (running a batch's every row, as built, against running
only the rows that still think).

    python experiments/adaptive_curve.py        # K=1 and K=1 trained with thought dropout 0.3, seeds 1337-1339
    python experiments/adaptive_curve.py --runs=ponderlm2-k2 --seeds=1337 --thresholds="(1,0.6,0)" --out=out-adaptive

Each run's sweep is `python eval.py --init_from=<out_root>/<run>-s<seed>/ckpt.pt --split=test --max_jacobi=0
--jacobi_tols=() --exact=False --think_thresholds=<thresholds> --out=<out>/<run>-s<seed>` with OMP_NUM_THREADS=1
(its report <run>-s<seed>.json is reused when it exists: delete it to measure again); the points' test losses and
FLOPs come from results_dir's result files. The curves and the points are means over the seeds (each seed's
cheapest point below a point's loss is listed too). Writes <out>/adaptive.md (the tables) and <out>/adaptive.png.
"""
import json
import os
import subprocess
import sys
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig  # noqa: E402
from nanoponder.cost import adaptive_flops_per_token, cpu_name, inference_flops_per_token  # noqa: E402
from nanoponder.runtime import UserError, atomic_write, check_output_dir, run_cli, write_json  # noqa: E402

runs = 'ponderlm2-k1,ponderlm2-k1-td'  # PonderLM-2 runs (repro.py names), each swept over the thresholds
points = 'vanilla,vanilla-2x'          # runs drawn as points, from results_dir
seeds = '1337,1338,1339'
thresholds = (1, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0)
out_root = os.path.join(ROOT, 'out-repro')  # the run folders (their ckpt.pt)
results_dir = os.path.join(ROOT, 'experiments', 'results_v2')  # the result files of the points
out = os.path.join(ROOT, 'experiments', 'adaptive')  # the sweeps' reports, adaptive.md, adaptive.png
SHAPES = ('pythia-70m', 'pythia-410m', 'pythia-1.4b')  # the FLOPs at these shapes, from the measured shares


def sweep(name, seed):
    """The run's eval.py report (its 'adaptive' rows), made now unless out holds it; -> (report, seconds or None)."""
    path = os.path.join(out, f'{name}-s{seed}')
    if os.path.exists(path + '.json'):
        with open(path + '.json') as f:
            return json.load(f), None
    ckpt = os.path.join(out_root, f'{name}-s{seed}', 'ckpt.pt')
    cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), f'--init_from={ckpt}', '--split=test', '--max_jacobi=0',
           '--jacobi_tols=()', '--exact=False', f"--think_thresholds=({','.join(map(str, thresholds))},)",
           f'--out={path}']
    print(f"{name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode != 0:
        raise UserError(f"eval.py failed on {ckpt}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    seconds = time.time() - t0
    if os.path.exists(path + '_jacobi.png'):  # (the R=0 plot this sweep does not need)
        os.remove(path + '_jacobi.png')
    with open(path + '.json') as f:
        report = json.load(f)
    report['wall_seconds'] = seconds
    write_json(path + '.json', report)
    return report, seconds


def point(name, seed):
    path = os.path.join(results_dir, f'{name}-s{seed}.json')
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: run `python experiments/repro.py --runs={name} --seeds={seed}`")
    with open(path) as f:
        r = json.load(f)
    if not all(isinstance(r.get(k), (int, float)) for k in ('test_loss', 'inference_flops_per_token')):
        raise UserError(f"{path} has no test_loss and inference_flops_per_token: a result file of the test split "
                        f"(experiments/repro.py) is needed")
    return dict(label=r.get('label', name), loss=r.get('test_loss_exact') or r['test_loss'],
                flops=r['inference_flops_per_token'])


def check_run(name, seed):
    """Before any work: the run is a PonderLM-2 model, and a sweep out holds already has these thresholds."""
    path = os.path.join(out, f'{name}-s{seed}.json')
    if os.path.exists(path):
        with open(path) as f:
            had = [r['threshold'] for r in json.load(f).get('adaptive', [])]
        if had != [float(t) for t in thresholds]:
            raise UserError(f"{path} holds a sweep over thresholds {had}, not {list(thresholds)}: delete it to "
                            f"measure again, or pass its thresholds")
        return
    ckpt = os.path.join(out_root, f'{name}-s{seed}', 'ckpt.pt')
    if not os.path.exists(ckpt):
        raise UserError(f"{ckpt} is missing: train it with `python experiments/repro.py --runs={name} "
                        f"--seeds={seed}`")
    if not torch.load(ckpt, map_location='cpu', weights_only=True)['model_args'].get('n_thoughts'):
        raise UserError(f"{name} has no thoughts to skip: --runs takes PonderLM-2 runs (its points go in --points)")


def reach(curve, loss):
    """The fewest FLOPs at which the curve [(flops, loss)], read piecewise linearly, has at most `loss`; None."""
    best = None
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + [pts[-1]]):
        if y0 <= loss:
            best = x0 if best is None else min(best, x0)
        elif y1 <= loss < y0:
            best = x0 + (x1 - x0) * (y0 - loss) / (y0 - y1) if best is None else best
    return best


def at(curve, flops):
    """The curve's loss at `flops`, read piecewise linearly; None outside it."""
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return None


def break_even(config):
    """K=1: the share of thoughts a model must skip for the check (one head product per token) to pay."""
    full = inference_flops_per_token(config)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if adaptive_flops_per_token(config, mid, mid) > full else (lo, mid)
    return hi if adaptive_flops_per_token(config, 1, 1) <= full else None


def mean_report(sweeps):
    """One run's sweeps {seed: (report, seconds)} -> one report whose rows are the means over the seeds (the loss's
    min and max kept; flips summed), its wall seconds the sum."""
    reports = [report for report, _ in sweeps.values()]
    rows = []
    for per_seed in zip(*(report['adaptive'] for report in reports)):
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in
                ('threshold', 'skipped', 'stopped', 'loss', 'flops_per_token', 'tokens_per_second')}
        decisions = sum(r['flip_decisions'] for r in per_seed)
        rows.append({**mean, 'loss_min': min(r['loss'] for r in per_seed), 'loss_max': max(r['loss'] for r in per_seed),
                     'flip_decisions': decisions,
                     'flip_rate': sum(r['flip_rate'] * r['flip_decisions'] for r in per_seed) / decisions,
                     'per_seed': {seed: (r['flops_per_token'], r['loss']) for seed, r in zip(sweeps, per_seed)}})
    walls = [seconds or report.get('wall_seconds') for report, seconds in sweeps.values()]
    return {'tokens': reports[0]['tokens'], 'config': reports[0]['config'], 'adaptive': rows, 'seeds': list(sweeps),
            **({'wall_seconds': sum(walls)} if all(walls) else {})}


def mean_point(per_seed):
    """A point run's {seed: point} -> the mean point (its per-seed losses kept)."""
    first = next(iter(per_seed.values()))
    return dict(label=first['label'], flops=first['flops'], per_seed={s: p['loss'] for s, p in per_seed.items()},
                loss=sum(p['loss'] for p in per_seed.values()) / len(per_seed))


def cheapest_below(points, loss):
    """The cheapest (flops, loss, threshold) of points at or below loss, or None."""
    return min((p for p in points if p[1] <= loss), default=None)


def tables(reports, pts):
    seed_list = reports[next(iter(reports))]['seeds']
    lines = [f"Machine: {cpu_name()}; eval.py in float32, one thread; the whole test split; seeds "
             f"{', '.join(map(str, seed_list))}: each figure is the mean over them (the loss's range in brackets).",
             '']
    for name, report in reports.items():
        rows = report['adaptive']
        took = f", {report['wall_seconds']:.0f} s wall in all" if 'wall_seconds' in report else ''
        lines += [f"### {name} ({report['tokens']:,} test tokens{took})", '',
                  '| τ | thoughts skipped | test loss | FLOPs / token | tokens/s (batch 1) | flips |',
                  '|---|---|---|---|---|---|']
        spread = len(seed_list) > 1
        lines += [f"| {r['threshold']:g} | {r['skipped']:.1%} | {r['loss']:.4f}"
                  + (f" ({r['loss_min']:.4f}–{r['loss_max']:.4f})" if spread else '')
                  + f" | {r['flops_per_token'] / 1e6:.2f}M | {r['tokens_per_second']:.0f} | "
                  f"{r['flip_rate']:.2%} of {r['flip_decisions']:,} |" for r in rows]
        curve = [(r['flops_per_token'], r['loss']) for r in rows]
        lines.append('')
        for p in pts:
            x = reach(curve, p['loss'])
            y = at(curve, p['flops'])
            measured = cheapest_below([(f, l, r['threshold']) for (f, l), r in zip(curve, rows)], p['loss'])
            lines.append(f"- against {p['label']} ({p['loss']:.4f} at {p['flops'] / 1e6:.2f}M FLOPs): "
                         + (f"the cheapest measured point at or below its loss is τ={measured[2]:g}, "
                            f"{measured[0] / 1e6:.2f}M FLOPs ({measured[0] / p['flops']:.2f}x its), {measured[1]:.4f}; "
                            f"read between the points, the curve reaches its loss from {x / 1e6:.2f}M "
                            f"({x / p['flops']:.2f}x)" if x is not None else "the curve never reaches its loss")
                         + (f"; at its FLOPs the curve's loss is {y:.4f} ({y - p['loss']:+.4f})" if y is not None
                            else "; its FLOPs are outside the curve")
                         + ("; per seed, the cheapest measured point at or below its loss: " + ', '.join(
                             f"{seed} " + (f"τ={c[2]:g} ({c[0] / p['flops']:.2f}x)" if c else 'none')
                             for seed in seed_list for c in [cheapest_below(
                                 [(*r['per_seed'][seed], r['threshold']) for r in rows], p['per_seed'][seed])])
                            if spread else ''))
        lines.append('')
    lines += ['### The measured skip shares at the Pythia shapes (K=1, 2048 context, attention at its mean position)',
              '', '| run, τ | thoughts skipped | ' + ' | '.join(f'{s}: FLOPs vs always thinking' for s in SHAPES)
              + ' |', '|---|---|' + '---|' * len(SHAPES)]
    configs = [GPTConfig.preset(s, n_thoughts=1) for s in SHAPES]
    for name, report in reports.items():
        for r in report['adaptive']:
            if r['threshold'] < 1:
                ratios = [adaptive_flops_per_token(c, r['skipped'], r['stopped']) / inference_flops_per_token(c)
                          for c in configs]
                lines.append(f"| {name} τ={r['threshold']:g} | {r['skipped']:.1%} | "
                             + ' | '.join(f'{x:.3f}' for x in ratios) + ' |')
    evens = [break_even(c) for c in configs]
    lines += ['| break-even skip share | | ' + ' | '.join(f'{e:.1%}' if e is not None else 'never' for e in evens)
              + ' |', '']
    return '\n'.join(lines)


def plot(reports, pts, path):
    """Each sweep as a line with τ beside its points, the points as markers; the sweeps' crowded end (the high τ,
    within 8% of thinking always) again in an inset, labelled there, the points within 1.5% of it with one label."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    full = max(r['flops_per_token'] for report in reports.values() for r in report['adaptive']) / 1e6
    inset = ax.inset_axes([0.30, 0.52, 0.36, 0.42])
    for i, (name, report) in enumerate(reports.items()):
        rows = report['adaptive']
        xs, ys = [r['flops_per_token'] / 1e6 for r in rows], [r['loss'] for r in rows]
        for axes in (ax, inset):
            line, = axes.plot(xs, ys, 'o-', label=f"{name} (τ sweep)", ms=4)
        end = [(r, x, y) for r, x, y in zip(rows, xs, ys) if x > 0.985 * full]
        for r, x, y in zip(rows, xs, ys):
            if x <= 0.985 * full:
                (inset if x > 0.92 * full else ax).annotate(
                    f"{r['threshold']:g}", (x, y), xytext=(4, -10 if i % 2 else 5), textcoords='offset points',
                    fontsize=7, color=line.get_color())
        if end:  # one label for the cluster, above it for the first sweep, below for the second
            x, y = max(x for _, x, _ in end), (max if i % 2 == 0 else min)(y for _, _, y in end)
            inset.annotate('τ ' + ', '.join(f"{r['threshold']:g}" for r, _, _ in end), (x, y),
                           xytext=(6, 6 if i % 2 == 0 else -12), textcoords='offset points', fontsize=7,
                           color=line.get_color())
    for p, marker in zip(pts, 'sDv^'):
        for axes in (ax, inset):
            axes.plot([p['flops'] / 1e6], [p['loss']], marker, color='black', ms=7, ls='none',
                      label=p['label'] if axes is ax else None)
    ys = [r['loss'] for report in reports.values() for r in report['adaptive'] if r['flops_per_token'] / 1e6
          > 0.92 * full] + [p['loss'] for p in pts if p['flops'] / 1e6 > 0.92 * full]
    inset.set_xlim(0.92 * full, 1.075 * full)  # room on the right for the cluster's labels
    inset.set_ylim(min(ys) - 0.003, max(ys) + 0.003)
    inset.tick_params(labelsize=7)
    inset.set_title('τ near 1', fontsize=7)
    inset.grid(alpha=0.3)
    ax.set_xlim(right=1.08 * full)
    ax.indicate_inset_zoom(inset, edgecolor='gray')
    ax.set_xlabel('inference FLOPs per token (M), exact decoding through the KV cache, checks included')
    ax.set_ylabel('test loss (whole test split)')
    seed_list = next(iter(reports.values()))['seeds']
    ax.set_title(f"Adaptive thoughts on the CPU experiment (mean over seeds {', '.join(map(str, seed_list))}): "
                 f"τ labels each point", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='center right')
    fig.savefig(path)
    plt.close(fig)


def pass_ms_by_rows(config, rows=(1, 2, 4, 8, 16), repeats=30):
    """Median ms of one cached decoding pass (one slot per row through the trunk, after block_size - 1 tokens'
    slots) at each number of rows, alternating between them; random weights (the time does not depend on them)."""
    torch.manual_seed(0)
    context = config.block_size - 1
    model = GPT(config).eval()
    base = context * config.slots
    caches = {b: model.new_caches(b, context + 1, 'cpu')[0] for b in rows}
    times = {b: [] for b in rows}
    with torch.no_grad():
        for b, cache in caches.items():
            cache.k.normal_(), cache.v.normal_()
        for _ in range(repeats + 3):  # the first 3 rounds warm up
            for b, cache in caches.items():
                cache.pos = base  # the same slot again, after the same cached keys
                x = torch.randn(b, 1, config.n_embd)
                t0 = time.perf_counter()
                model.trunk(x, torch.tensor([context]), cache)
                times[b].append(time.perf_counter() - t0)
    return {b: 1e3 * statistics.median(t[3:]) for b, t in times.items()}


def rows_table(config):
    """The pass time by rows for the runs' shape and pythia-70m's, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = {'this shape': config, 'pythia-70m': GPTConfig.preset('pythia-70m', n_thoughts=1, block_size=256)}
        ms = {name: pass_ms_by_rows(c) for name, c in shapes.items()}
    finally:
        torch.set_num_threads(threads)
    lines = ['### One cached decoding pass by the rows it runs (one thread, a full context cached, median of 30)', '',
             '| rows | ' + ' | '.join(f'{n}: ms per pass | vs 1 row' for n in ms) + ' |', '|---|' + '---|---|' * len(ms)]
    for b in ms['this shape']:
        lines.append(f'| {b} | ' + ' | '.join(f'{m[b]:.3f} | {m[b] / m[1]:.2f}x' for m in ms.values()) + ' |')
    return '\n'.join(lines + [''])


def main():
    names = [n.strip() for n in runs.split(',') if n.strip()]
    if not names:
        raise UserError("runs names no run: pass PonderLM-2 runs of experiments/repro.py, e.g. --runs=ponderlm2-k1")
    if not (isinstance(thresholds, (tuple, list)) and thresholds
            and all(type(t) in (int, float) and 0 <= t <= 1 for t in thresholds)):
        raise UserError(f"thresholds must be numbers in [0, 1], e.g. (1,0.6,0), got {thresholds!r}")
    check_output_dir(out, '--out')
    try:
        seed_list = [int(x) for x in str(seeds).split(',')]
    except ValueError:
        raise UserError(f"seeds must be whole numbers separated by commas, got {seeds!r}") from None
    if len(set(seed_list)) < len(seed_list):
        raise UserError(f"seeds lists a seed more than once: {seeds!r}")
    # before any sweep: a missing point or run is said now
    pts = [mean_point({s: point(n.strip(), s) for s in seed_list}) for n in points.split(',') if n.strip()]
    for name in names:
        for s in seed_list:
            check_run(name, s)
    os.makedirs(out, exist_ok=True)
    reports = {name: mean_report({s: sweep(name, s) for s in seed_list}) for name in names}
    text = tables(reports, pts) + '\n' + rows_table(GPTConfig(**reports[names[0]]['config']))
    with atomic_write(os.path.join(out, 'adaptive.md'), 'w') as f:
        f.write(text + '\n')
    plot(reports, pts, os.path.join(out, 'adaptive.png'))
    print(text)
    print(f"wrote {os.path.join(out, 'adaptive.md')} and adaptive.png")


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    run_cli(main)
