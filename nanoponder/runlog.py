"""
The record of a training run, kept by rank 0: out_dir/metrics.jsonl (one JSON object per line: train lines with
loss, lr, tokens/s, MFU, R; evaluation lines with val_loss), the loss curve out_dir/loss.png, and the console, a
tqdm bar in a terminal or a plain line per log_interval in a file.

    from nanoponder.runlog import read_metrics
    entries = read_metrics('out-shakespeare-ponder/metrics.jsonl')
    val = [(e['iter'], e['val_loss']) for e in entries if 'val_loss' in e]
"""
import json
import math
import os
import sys

from tqdm import tqdm

from nanoponder.cost import estimate_mfu, mfu_peak
from nanoponder.runtime import failure, write_result


class RunLog:
    """Rank 0's record and display: out_dir/metrics.jsonl (one JSON object per line), the loss curve
    out_dir/loss.png, Weights & Biases if asked, and the console: a tqdm bar when stdout is a terminal, a
    plain line per log_interval otherwise (`nohup ... > log`, `| tee`)."""

    def __init__(self, out_dir, run, log_interval, resumed_at=None, wandb=None):
        """run: the training run's state (total_iters, warmup, iter_num, ...); resumed_at: the checkpoint's iteration
        when resuming (the log keeps its lines up to there); wandb: an initialized wandb module, or None."""
        self.out_dir, self.log_interval, self.wandb = out_dir, log_interval, wandb
        self.path = os.path.join(out_dir, 'metrics.jsonl')
        self.entries = read_metrics(self.path, resumed_at) if resumed_at is not None else []
        with write_result(self.path, 'w') as f:
            f.writelines(json_line(e) for e in self.entries)
        self.total, self.warmup = run.total_iters, run.warmup
        self.window_time, self.window_iters = 0.0, 0  # training time and iterations since the last log line
        self.peak_flops = None  # what MFU is against: measured on a CPU at the first log line (see mfu_peak)
        self.no_matplotlib = False
        self.bar = None
        if sys.stdout.isatty() and terminal_has_size():
            self.bar = tqdm(total=run.total_iters, initial=run.iter_num, dynamic_ncols=True, unit='it', file=sys.stdout)

    def say(self, text):
        """Print a line (above the bar in a terminal). A closed stdout (the reader of a pipe died, e.g. `tee`
        with the same Ctrl-C) must not stop the run or its last save: output then goes nowhere."""
        try:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)
        except (BrokenPipeError, OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.bar = None

    def record(self, entry):
        self.entries.append(entry)
        try:
            with open(self.path, 'a') as f:
                f.write(json_line(entry))
        except OSError as e:  # disk full: a cut last line is skipped by read_metrics, the earlier ones are intact
            raise failure(f"could not write {self.path}: {e.strerror or e}; its earlier lines are kept") from None
        if self.wandb:
            self.wandb.log({k: v for k, v in entry.items() if k != 'iter' and v is not None}, step=entry['iter'])
        if 'val_loss' in entry:
            self.plot()

    def iteration_done(self, run, stats, seconds):
        self.window_time += seconds
        self.window_iters += 1
        if self.bar is not None:
            try:
                self.bar.update(1)
            except (BrokenPipeError, OSError):
                self.say('')  # redirects stdout to devnull and drops the bar
        if run.iter_num % self.log_interval:
            return
        tokens_per_sec = self.window_iters * run.tokens_per_iter / self.window_time
        if self.peak_flops is None:
            self.peak_flops = mfu_peak(run.device, run.ptdtype)
        mfu = estimate_mfu(run.raw_model.config, tokens_per_sec / run.world_size, run.mean_jacobi, self.peak_flops)
        grad_norm = stats['grad_norm']
        self.record({'iter': run.iter_num, 'loss': stats['loss'], 'lr': stats['lr'], 'tokens_per_sec': tokens_per_sec,
                     'mfu': mfu, 'R': stats['R'], 'grad_norm': None if grad_norm is None else grad_norm.item(),
                     'epoch': run.iter_num / run.train_batches.iters_per_epoch})
        mfu_text = 'n/a' if mfu is None else f"{100 * mfu:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                                 mfu=mfu_text, refresh=False)
        else:
            eta = (run.total_iters - run.iter_num) * self.window_time / self.window_iters
            self.say(f"iter {run.iter_num}/{run.total_iters}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
                     f"{tokens_per_sec:,.0f} tokens/s, mfu {mfu_text}, eta {format_seconds(eta)}")
        self.window_time, self.window_iters = 0.0, 0

    def plot(self):
        """Redraw out_dir/loss.png: train loss per log step and val loss per evaluation. The y-range comes from
        the losses after warmup, so the first steps' loss (ln V, ~11 for Pythia's vocabulary) does not flatten
        everything after it."""
        try:
            import matplotlib
            matplotlib.use('Agg')  # files only, no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            if not self.no_matplotlib:
                self.say("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
                self.no_matplotlib = True
            return
        train = [(e['iter'], e['loss']) for e in self.entries if 'loss' in e]
        val = [(e['iter'], e['val_loss']) for e in self.entries if 'val_loss' in e]
        fig, ax = plt.subplots(figsize=(8, 5))
        if train:
            ax.plot(*zip(*train), label='train', alpha=0.7)
        if val:
            ax.plot(*zip(*val), 'o-', label='val')
        title = os.path.basename(os.path.abspath(self.out_dir))
        settled = [loss for it, loss in train + val if it > max(self.warmup, 0.05 * self.total)]
        if len(settled) >= 2 and max(settled) > min(settled):
            lo, hi = min(settled), max(settled)
            top = hi + 0.25 * (hi - lo)
            ax.set_ylim(lo - 0.05 * (hi - lo), top)
            above = [loss for _, loss in train + val if loss > top]
            if above:  # say what the range leaves out, or the curve seems to start lower than it did
                title += f" ({len(above)} early points above the top, up to {max(above):.2f})"
        ax.set_xlabel('iteration')
        ax.set_ylabel('loss (nats/token)')
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        with write_result(os.path.join(self.out_dir, 'loss.png')) as f:
            fig.savefig(f, format='png', dpi=100)
        plt.close(fig)

    def close(self):
        if self.bar is not None:
            try:
                self.bar.close()
            except (BrokenPipeError, OSError):
                pass


def terminal_has_size():
    """Whether stdout's terminal reports its size. One that reports 0 columns or rows (some containers and serial
    consoles) gets no visible tqdm bar at all, so it gets the plain lines of a log file instead."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


class SilentLog:
    """What ranks other than 0 log: nothing."""

    def say(self, text):
        pass

    def record(self, entry):
        pass

    def iteration_done(self, run, stats, seconds):
        pass


def read_metrics(path, up_to=math.inf):
    """The entries of metrics.jsonl up to iteration up_to: a resume keeps what happened up to its checkpoint;
    the lines after it belong to the part about to be redone."""
    entries = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if entry.get('iter', math.inf) <= up_to:
                    entries.append(entry)
    return entries


def json_line(entry):
    return json.dumps(entry) + '\n'


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
