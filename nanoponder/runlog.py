"""
The record of a training run, kept by rank 0: out_dir/metrics.jsonl (one JSON object per line: train lines with
loss, lr, tokens/s, MFU, R; evaluation lines with val_loss), the loss curve out_dir/loss.png, and the console, a
tqdm bar in a terminal or a plain line per log_interval in a file, which start with the run's summary.

    from nanoponder.runlog import read_metrics
    entries = read_metrics('out-shakespeare-ponder/metrics.jsonl')
    val = [(e['iter'], e['val_loss']) for e in entries if 'val_loss' in e]
"""
import json
import math
import os
import sys

import torch
from tqdm import tqdm

from nanoponder.cost import estimate_mfu, flops_per_token, mfu_peak, plan_memory
from nanoponder.parallel import gather_dtype
from nanoponder.runtime import UserError, failure, human, write_result


def open_log(cfg, model, pretrained, train_batches, world_size, device, dtype, iter_num, total_iters, warmup,
             decay_end, notes):
    """Rank 0's RunLog of a training run (cfg: its config), which starts with the run's summary and notes."""
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    peak = []  # what MFU is against: mfu_peak, measured at the first log line (a CPU measures its matmul peak)

    def mfu(tokens_per_sec):  # of one device, at the mean R of training
        if not peak:
            peak.append(mfu_peak(device, dtype))
        return estimate_mfu(model.config, tokens_per_sec / world_size, cfg.jacobi_train_range, peak[0],
                            cfg.jacobi_grad_passes)

    log = RunLog(cfg.out_dir, cfg.log_interval, total_iters, warmup, iter_num,
                 resumed=cfg.init_from == 'resume', wandb=start_wandb(cfg), mfu=mfu,
                 tokens_per_iter=tokens_per_iter, iters_per_epoch=train_batches.iters_per_epoch)
    for line in summary(cfg, model, pretrained, train_batches, world_size, device, dtype, iter_num, total_iters,
                        warmup, decay_end) + notes:
        log.say(line)  # (say survives a closed stdout: `| head` may have read the config echo and gone)
    return log


def start_wandb(cfg):
    if not cfg.wandb_log:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False") from None
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))
    return wandb


def summary(cfg, model, pretrained, train_batches, world_size, device, dtype, iter_num, total_iters, warmup,
            decay_end):
    """The run in a few lines, printed before training."""
    config, blocks = model.config, train_batches.blocks
    accum = cfg.gradient_accumulation_steps // world_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    source = f"{pretrained} (its architecture)" if pretrained else cfg.model or 'custom'
    lo, hi = cfg.jacobi_train_range
    G = cfg.jacobi_grad_passes
    p = cfg.thought_dropout
    method = config.method_label + (f", R in {lo}..{hi} in training{f' (backward through the last {G})' if G else ''}"
                                    f"{f', thought dropout {p:g}' if p else ''}, {config.n_jacobi} in eval"
                                    if config.n_thoughts else '')
    plan = plan_memory(config, cfg.batch_size, cfg.block_size, n_jacobi=hi, dtype=dtype, parallelism=cfg.parallelism,
                       world_size=world_size, grad_accum=accum, activation_checkpointing=cfg.activation_checkpointing,
                       gather_dtype=gather_dtype(cfg.parallelism, device, dtype), device_type=torch.device(device).type,
                       grad_passes=G, thought_dropout=p)
    return [
        f"model: {source} {config.n_layer}L/{config.n_head}H/{config.n_embd}d, {method}; "
        f"{human(model.get_num_params())} non-embedding params ({human(model.get_num_params(False))} total)",
        f"data: {cfg.data_dir}, {human(blocks.n_blocks * cfg.block_size)} train tokens in {blocks.n_blocks:,} blocks "
        f"of {cfg.block_size}, {train_batches.iters_per_epoch:,} iterations per epoch",
        f"batch: {cfg.batch_size} x {accum} accumulation x {world_size} process(es) = "
        f"{cfg.batch_size * cfg.gradient_accumulation_steps} sequences = {tokens_per_iter:,} tokens per iteration",
        f"schedule: {total_iters:,} iterations ({total_iters / train_batches.iters_per_epoch:.2f} epochs, "
        f"{human(total_iters * tokens_per_iter)} tokens), lr {cfg.learning_rate:g}, warmup {warmup}, "
        f"cosine to {cfg.learning_rate * cfg.min_lr_ratio:g} at {decay_end}"
        + (f"; resuming at {iter_num}" if iter_num else ''),
        f"FLOPs/token: {flops_per_token(config, (lo, hi), training=True, grad_passes=G):.3g} training, "
        f"{flops_per_token(config, config.n_jacobi, training=False):.3g} eval; device {device}, "
        f"{str(dtype).removeprefix('torch.')}, compile={cfg.compile}, parallelism: "
        f"{cfg.parallelism if torch.distributed.is_initialized() else 'none (one process)'}",
        plan.summary()] + schedule_notes(cfg, total_iters, warmup, decay_end)


def schedule_notes(cfg, total_iters, warmup, decay_end):
    """What a schedule that is legal but probably not meant does (a smoke test's short run may mean it)."""
    if warmup >= total_iters:
        return [f"note: the warmup ({warmup} iterations) is as long as the run ({total_iters}) or longer: "
                f"the learning rate never reaches its peak {cfg.learning_rate:g} and never decays"]
    if decay_end <= warmup:
        return [f"note: lr_decay_iters={cfg.lr_decay_iters} is not after the warmup ({warmup} iterations): the "
                f"learning rate drops from the warmup straight to {cfg.learning_rate * cfg.min_lr_ratio:g}"]
    return []


class RunLog:
    """Rank 0's record and display: out_dir/metrics.jsonl (one JSON object per line), the loss curve
    out_dir/loss.png, Weights & Biases if asked, and the console: a tqdm bar when stdout is a terminal, a
    plain line per log_interval otherwise (`nohup ... > log`, `| tee`)."""

    def __init__(self, out_dir, log_interval, total_iters, warmup, iter_num=0, resumed=False, wandb=None, mfu=None,
                 tokens_per_iter=1, iters_per_epoch=1):
        """iter_num: where the run starts; resumed: the log keeps its lines up to there; wandb: an initialized
        wandb module, or None; mfu(tokens_per_sec) -> the MFU of training at that speed, or None."""
        self.out_dir, self.log_interval, self.wandb, self.mfu = out_dir, log_interval, wandb, mfu
        self.tokens_per_iter, self.iters_per_epoch = tokens_per_iter, iters_per_epoch
        self.path = os.path.join(out_dir, 'metrics.jsonl')
        self.entries = read_metrics(self.path, iter_num) if resumed else []
        with write_result(self.path, 'w') as f:
            f.writelines(json_line(e) for e in self.entries)
        self.total, self.warmup = total_iters, warmup
        self.window_time, self.window_iters = 0.0, 0  # training time and iterations since the last log line
        self.no_matplotlib = False
        self.bar = None
        if sys.stdout.isatty() and terminal_has_size():
            self.bar = tqdm(total=total_iters, initial=iter_num, dynamic_ncols=True, unit='it', file=sys.stdout)

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

    def evaluation(self, iter_num, loss, best_val_loss, improved):
        """An evaluation's line and record."""
        ppl = math.exp(loss) if loss < 700 else math.inf
        self.say(f"iter {iter_num}: val loss {loss:.4f}, perplexity {ppl:.2f}" + (" (best)" if improved else ""))
        self.record({'iter': iter_num, 'val_loss': loss, 'val_ppl': ppl, 'best_val_loss': best_val_loss,
                     'tokens': iter_num * self.tokens_per_iter})

    def iteration_done(self, iter_num, stats, seconds):
        """An iteration took seconds; every log_interval, a line and a record with its stats (loss, lr, R,
        grad_norm) and the speed since the last line."""
        self.window_time += seconds
        self.window_iters += 1
        if self.bar is not None:
            try:
                self.bar.update(1)
            except (BrokenPipeError, OSError):
                self.say('')  # redirects stdout to devnull and drops the bar
        if iter_num % self.log_interval:
            return
        tokens_per_sec = self.window_iters * self.tokens_per_iter / self.window_time
        mfu = self.mfu(tokens_per_sec) if self.mfu else None
        grad_norm = stats['grad_norm']
        self.record({'iter': iter_num, 'loss': stats['loss'], 'lr': stats['lr'], 'tokens_per_sec': tokens_per_sec,
                     'mfu': mfu, 'R': stats['R'], 'grad_norm': None if grad_norm is None else grad_norm.item(),
                     'epoch': iter_num / self.iters_per_epoch})
        mfu_text = 'n/a' if mfu is None else f"{100 * mfu:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                                 mfu=mfu_text, refresh=False)
        else:
            eta = (self.total - iter_num) * self.window_time / self.window_iters
            self.say(f"iter {iter_num}/{self.total}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def say(self, text):
        pass

    def evaluation(self, iter_num, loss, best_val_loss, improved):
        pass

    def iteration_done(self, iter_num, stats, seconds):
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
