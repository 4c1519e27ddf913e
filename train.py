"""
Train a GPT-NeoX (Pythia) language model: vanilla, with PonderLM-2 latent thoughts, with PonderLM pondering, or
with one of the papers' baselines (Pause tokens, Loop, hidden-state feedback). One process on a CPU or GPU, or
several GPUs and nodes with DDP or FSDP2. The defaults are the headline run: PonderLM-2 with one thought per token
(K=1) on pythia-70m, one epoch of MiniPile.

    python train.py config/shakespeare_ponder.py                    # minutes on a CPU; the first run prepares
        # data/shakespeare-bpe512 (python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512); offline:
        # --input=path/to/tinyshakespeare.txt
    python train.py config/pythia70m_ponder.py --prepare=True         # one GPU; prepares MiniPile first if missing
    torchrun --standalone --nproc_per_node=8 train.py config/pythia70m_ponder.py   # 8 GPUs, same global batch
    python train.py config/pythia70m_ponder.py --batch_size=4 --gradient_accumulation_steps=32  # less memory
    torchrun --standalone --nproc_per_node=8 train.py config/pythia1.4b_ponder.py --parallelism=fsdp \
        --activation_checkpointing=True                               # sharded: models DDP cannot fit
    python train.py config/pythia70m_ponder.py --init_from=resume     # go on from out_dir/ckpt.pt, exactly
    python train.py config/shakespeare_ponder.py --thought_dropout=0.3 --out_dir=out-shakespeare-td  # trained to
        # skip thoughts, for sample.py --think_threshold=0.6 (docs/experiments.md: adaptive thoughts)
    python train.py config/pythia70m_ponder.py --init_from=EleutherAI/pythia-70m --out_dir=out-cont  # continue
        # training a Hugging Face model: its architecture, and the method and block_size of this config
    nohup python train.py config/pythia70m_ponder.py > train.log 2>&1 &   # a plain line per log_interval
    python train.py --help                                            # every config key and its value

gradient_accumulation_steps counts micro-batches over all processes: with N GPUs each does 1/N of them. An
out_dir belongs to one run (out_dir/train.lock while it trains): a new run where a checkpoint is stops with an error
(resume it, or --overwrite=True). Ctrl-C or SIGTERM saves out_dir/ckpt.pt at the end of the iteration, then exits
with 130 or 143; checkpoints are written atomically. Exit codes: nanoponder/runtime.py.
"""

import math
import os
import signal
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

from configurator import known_config
from nanoponder import kernels
from nanoponder.checkpoint import restore_run, save_run
from nanoponder.parallel import clip_gradients, set_gradient_sync, setup_distributed, wrap
import prepare_data
from nanoponder.prerun import (build_model, check_config, data_to_prepare, open_data, remove_previous_run, schedule,
                               training_session)
from nanoponder.runlog import SilentLog, open_log
from nanoponder.runtime import (autocast, compile_blocks, failure, keep_freed_memory, resolve_device, resolve_dtype,
                                run_cli)

# -----------------------------------------------------------------------------
# config: plain globals, overridden by config files and --key=value (configurator.py); main() reads them as cfg
# I/O
out_dir = 'out'                 # the run's directory: ckpt.pt, best.pt, metrics.jsonl, loss.png
eval_interval = 500             # iterations between evaluations (each may save a checkpoint)
eval_iters = 40                 # val batches per evaluation and process
log_interval = 10               # iterations between log lines
always_save_checkpoint = True   # save ckpt.pt at every evaluation, not only on a new best val loss
init_from = 'scratch'           # 'scratch', 'resume' (out_dir/ckpt.pt) or a Hugging Face model name/directory
overwrite = False               # let a new run replace the run already in out_dir
wandb_log = False               # also log to Weights & Biases (pip install wandb)
wandb_project = 'nanoPonder'    # its project ...
wandb_run_name = 'pythia70m-ponder'  # ... and run name
# data
data_dir = 'data/minipile'      # train.bin, val.bin, meta.json from prepare_data.py (or prepared here, see dataset)
dataset = ''                    # data_dir's dataset, prepared here when missing: shakespeare | text | minipile (with
                                # prepare=True: GBs to download, an hour of tokenizing); '' = a missing one is an error
tokenizer = 'pythia'            # ... with this tokenizer (only a missing data_dir: a prepared one is used as it is;
                                # sample.py's and eval.py's --tokenizer overrides a model's instead)
input = ''                      # a local copy of the text to prepare from (prepare_data.py's --input: offline)
prepare = False                 # let dataset='minipile' be prepared here
batch_size = 8                  # micro-batch of one process, in sequences
gradient_accumulation_steps = 16  # micro-batches per iteration over ALL processes: 8 x 16 = 128 sequences
block_size = 2048               # tokens per sequence
num_epochs = 1.0                # with max_iters = 0: train on this many epochs of packed blocks
max_iters = 0                   # iterations; 0 -> from num_epochs
# model
model = 'pythia-70m'            # a Pythia preset (pythia-14m ... pythia-2.8b), or '' to give the shape below
n_layer = 0                     # 0 -> the preset's; > 0 overrides it (needed with model='')
n_head = 0                      # 0 -> the preset's
n_embd = 0                      # 0 -> the preset's
vocab_size = 50304              # must be >= the data's vocab_size (meta.json)
n_thoughts = 1                  # PonderLM-2: K latent thoughts per token (0 = off)
n_jacobi = 3                    # PonderLM-2: Jacobi passes in evaluation
jacobi_train_range = (2, 4)     # PonderLM-2: R drawn uniformly from lo..hi per training iteration
jacobi_grad_passes = 0          # PonderLM-2: backpropagate through the last G of the R+1 passes only; 0 = all
thought_dropout = 0.0           # PonderLM-2: a token stops thinking at each thought with this probability
n_ponder = 0                    # PonderLM: pondering steps (0 = off)
ponder_multiply = False         # PonderLM: multiply the first input embeddings by n_ponder
n_pause = 0                     # Pause: K pause slots after every token (0 = off)
pause_token_id = 50288          # Pause: the embedding row of the pause vector, an id the data never holds
n_loop = 0                      # Loop: K extra runs of the layer stack, same weights (0 = off)
n_hidden = 0                    # hidden-state feedback: N steps (0 = off)
scale_embeds = True             # scale the embeddings: sqrt(2.5 H) with thoughts, else sqrt(H) (Loop, Hidden: model.py)
embed_scale_rule = 'official'   # or every method at one factor: 'sqrt2.5H', 'sqrtH', 'one', or a number: model.py
weight_init = 'small'           # 'small' (the papers') or 'normal' (normal(0, 0.02), stock Pythia): model.py
init_shrink_passes = 0          # 'small' init: output projections shrunk as for this many passes; 0 = the method's
# AdamW
learning_rate = 1e-3            # peak
weight_decay = 0.01             # on matmul and embedding weights, not on biases and LayerNorms
beta1 = 0.9                     # AdamW: decay of the gradients' running mean
beta2 = 0.95                    # AdamW: decay of their running square
eps = 1e-8                      # AdamW's denominator guard
grad_clip = 1.0                 # max gradient norm; 0 disables clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr_ratio * learning_rate
warmup_ratio = 0.01             # warmup as a share of max_iters ...
warmup_iters = 0                # ... unless this is > 0
lr_decay_iters = 0              # end of the cosine; 0 -> max_iters
min_lr_ratio = 0.1              # the learning rate at the end of the cosine, as a share of the peak
# system
device = 'auto'                 # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                  # 'auto' (nanoponder.runtime.resolve_dtype), 'float32', 'bfloat16', 'float16'
compile = True                  # torch.compile each Block (a minute of compiling, then faster steps)
activation_checkpointing = False  # recompute each Block in backward: activations of ~1 layer instead of all
parallelism = 'ddp'             # with several processes (torchrun): 'ddp' (replicas) or 'fsdp' (shards)
seed = 1337                     # the initial weights, the data order and the Jacobi passes R
_config_keys = list(known_config(globals()))  # the keys above, by configurator.py's rule (as --help lists them)
# -----------------------------------------------------------------------------


_stop_signal = None  # the signal that asked us to stop (SIGINT / SIGTERM); the loop saves and exits at a step boundary


def request_stop(signum, frame):
    """The signal handler only takes note (a print here could fail on a closed pipe): the loop saves and says so."""
    global _stop_signal
    if _stop_signal is None:  # repeats are ignored: torchrun forwards a Ctrl-C as SIGTERM on top of the SIGINT
        _stop_signal = signal.Signals(signum)


def config_dict():
    """The config keys and their values now (after the config files and --key=value)."""
    return {k: globals()[k] for k in _config_keys}


def lr_at(it, peak, min_lr, warmup, decay_end):
    """Learning rate of iteration it (0-based): linear warmup, cosine down to min_lr, then flat."""
    if it < warmup:
        return peak * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    progress = (it - warmup) / (decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)


def jacobi_passes(seed, iteration, lo, hi):
    """PonderLM-2's Jacobi passes R for one training iteration, uniform on lo..hi: a pure function of
    (seed, iteration), so every rank and a resumed run draw the same R."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(iteration))
    return int(torch.randint(lo, hi + 1, (), generator=g).item())


def thought_pattern(seed, iteration, micro_batch, shape, K, p):
    """Thought dropout: the thoughts (B, T) = shape each token of a micro-batch computes, 0..K, stopping at each
    with probability p. A pure function of (seed, iteration, micro_batch = micro_step * world_size + rank, the
    batch's index in the iteration), so that a resume and any number of processes draw the same."""
    g = torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(iteration)) * 1_000_003 + int(micro_batch) + 1)
                                      % 2**63)  # (a generator's seed is 64 bits)
    go_on = torch.rand((*shape, K), generator=g) >= p  # (B, T, K)
    return go_on.long().cumprod(dim=-1).sum(dim=-1)  # the thoughts before the first stop


def make_optimizer(model, cfg, fused):
    """AdamW; weight decay on the 2-D weights (matmuls and embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


@torch.no_grad()
def val_loss(net, val_batches, n_batches, ctx, distributed, world_size):
    """Mean loss over n_batches val batches of every rank, in eval mode (PonderLM-2: config n_jacobi passes)."""
    net.eval()
    total = torch.zeros((), device=val_batches.blocks.device)
    for k in range(n_batches):
        x, y = val_batches.get(k)
        with ctx:
            total += net(x, y)[1].float()
    net.train()
    if distributed:
        dist.all_reduce(total)
    return total.item() / (n_batches * world_size)


def main():
    """Check the config, claim out_dir, build the model and train it: the exit code (0, or 130 / 143 after a
    signal)."""
    cfg = SimpleNamespace(**config_dict())
    check_config(cfg)
    device = resolve_device(cfg.device)
    distributed, rank, world_size, device = setup_distributed(device, cfg.gradient_accumulation_steps)
    master = rank == 0  # rank 0 logs and writes the checkpoints
    # out_dir's lock for the run; on the way out: the lock released, the process group left, out of memory one line
    with training_session(cfg, master, distributed):
        device_type = device.split(':')[0]
        keep_freed_memory(device_type)  # a CPU step reuses the last step's memory (nanoponder/runtime.py)
        ptdtype = resolve_dtype(cfg.dtype, device_type)
        ctx = autocast(device_type, ptdtype)
        accum = cfg.gradient_accumulation_steps // world_size  # micro-batches per iteration of this process
        note = data_to_prepare(cfg, distributed)  # a small dataset the config names, missing: prepared here, once
        if note:
            prepare_data.prepare(cfg.dataset, cfg.input, cfg.tokenizer, cfg.data_dir, num_proc=prepare_data.num_proc,
                                 note=note)
        train_batches, val_batches, meta = open_data(cfg, device, accum, rank, world_size)
        total_iters, warmup, decay_end = schedule(cfg, train_batches.iters_per_epoch)
        # from scratch, out_dir/ckpt.pt or a Hugging Face model, checked against the config and the data
        model, ckpt, pretrained, tokenizer, notes = build_model(cfg, train_batches, val_batches, meta)
        kernels.install(model)  # faster attention and loss where they suit (nanoponder/kernels.py)
        model.activation_checkpointing = cfg.activation_checkpointing
        model.jacobi_grad_passes = cfg.jacobi_grad_passes  # PonderLM-2: the last G passes build a graph
        if cfg.compile:
            compile_blocks(model)  # per Block: the same graphs for every number of thought passes
        net = wrap(model, cfg.parallelism, device, ptdtype)  # DDP, or FSDP that shards model in place, or model
        eval_net = getattr(net, 'module', net)  # (DDP's module: evaluation needs no gradient sync)
        optimizer = make_optimizer(model, cfg, fused=device_type in ('cuda', 'cpu'))
        scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)  # fp16: loss scaling
        iter_num, epoch, position, best_val_loss = 0, 0, 0, math.inf
        if ckpt is not None:
            iter_num, epoch, position, best_val_loss = restore_run(ckpt, model, optimizer, scaler, device)
            del ckpt  # (its optimizer state and weights need not outlive the restore and the move to the device)
        epoch, position = train_batches.normalize(epoch, position)
        start_iter, best_saved_loss = iter_num, best_val_loss  # best.pt's val loss (a resumed run's was saved)
        # a resumed run does not evaluate again at its checkpoint's iteration: that one is in its log already
        evaluated_at = saved_at = iter_num if cfg.init_from == 'resume' else None
        ckpt_path, best_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'best.pt')
        if master and cfg.overwrite and cfg.init_from != 'resume':  # only now: a command that failed keeps them
            notes += remove_previous_run(cfg)

        def divergence(what, value):
            kept = (f"the last good checkpoint {ckpt_path} is kept" if saved_at is not None else
                    "no checkpoint was saved yet")
            return failure(f"{what} is {value} at iteration {iter_num}: training diverged; {kept}. "
                           f"Lower learning_rate (now {cfg.learning_rate:g}) or check the data")

        def save(best=False):  # every rank (fsdp gathers the state to rank 0, which writes it)
            if not save_run(ckpt_path, model, optimizer, scaler, device, distributed, best_path if best else None,
                            iter_num=iter_num, data_state={'epoch': epoch, 'position': position},
                            best_val_loss=best_val_loss, config=vars(cfg), pretrained=pretrained, tokenizer=tokenizer):
                raise divergence("a parameter", 'not finite')

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        log = SilentLog()  # rank 0's log opens with the run's summary and notes
        if master:
            log = open_log(cfg, model, pretrained, train_batches, world_size, device, ptdtype, iter_num, total_iters,
                           warmup, decay_end, notes)
        with log:
            X, Y = train_batches.get(epoch, position, 0)  # the first micro-batch; the later ones are read ahead
            stop = False
            while True:
                # evaluate (the first time at iteration 0, the last at the end) and save a checkpoint
                if (iter_num % cfg.eval_interval == 0 or iter_num >= total_iters) and iter_num != evaluated_at:
                    loss = val_loss(eval_net, val_batches, cfg.eval_iters, ctx, distributed, world_size)
                    evaluated_at = iter_num
                    if not math.isfinite(loss):
                        raise divergence("val loss", loss)
                    improved = loss < best_val_loss
                    best_val_loss = min(best_val_loss, loss)
                    log.evaluation(iter_num, loss, best_val_loss, improved)
                    # (a checkpoint at start_iter would only repeat the starting point)
                    if iter_num > start_iter and (improved or cfg.always_save_checkpoint or iter_num >= total_iters):
                        best = loss < best_saved_loss or not os.path.exists(best_path)  # the best of those saved
                        save(best)
                        best_saved_loss = loss if best else best_saved_loss
                        saved_at = iter_num
                if iter_num >= total_iters or stop:
                    break

                # one iteration: gradients accumulated over the micro-batches, then one optimizer step
                t0 = time.time()
                lr = lr_at(iter_num, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup, decay_end)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                R = jacobi_passes(cfg.seed, iter_num, *cfg.jacobi_train_range) if model.config.n_thoughts else None
                next_epoch, next_position = train_batches.next_iteration(epoch, position)
                loss_sum = torch.zeros((), device=device)
                for micro_step in range(accum):
                    set_gradient_sync(net, micro_step == accum - 1)  # reduce only in the last backward
                    kept = None
                    if R is not None and cfg.thought_dropout:
                        kept = thought_pattern(cfg.seed, iter_num, micro_step * world_size + rank, X.shape,
                                               model.config.n_thoughts, cfg.thought_dropout).to(X.device)
                    with ctx:
                        loss = net(X, Y, n_jacobi=R, kept=kept)[1] / accum  # the gradient of the iteration's mean loss
                    if micro_step + 1 < accum:  # read ahead while the accelerator works
                        X, Y = train_batches.get(epoch, position, micro_step + 1)
                    else:
                        X, Y = train_batches.get(next_epoch, next_position, 0)
                    loss_sum += loss.detach()
                    scaler.scale(loss).backward()
                grad_norm = None
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                epoch, position = next_epoch, next_position

                # the one sync per iteration: the loss over all ranks, and whether any rank was asked to stop
                synced = torch.stack([loss_sum.float(), torch.tensor(float(_stop_signal is not None), device=device)])
                if distributed:
                    dist.all_reduce(synced)
                loss, stop = synced[0].item() / world_size, synced[1].item() > 0
                if not math.isfinite(loss):
                    raise divergence("loss", loss)
                stats = {'loss': loss, 'lr': lr, 'R': R, 'grad_norm': grad_norm}
                log.iteration_done(iter_num, stats, time.time() - t0)

            if saved_at != iter_num:
                save()
            if stop:  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
                log.say(f"stopped by {_stop_signal.name if _stop_signal else 'a signal to another rank'} at iteration "
                        f"{iter_num}; saved {ckpt_path}: go on with --init_from=resume")
                return 128 + (_stop_signal or signal.SIGTERM)
            if start_iter >= total_iters:  # a resume of a finished run: say so instead of "saved"
                log.say(f"nothing to train: {ckpt_path} is at iteration {start_iter}, the schedule ends at "
                        f"{total_iters}; raise --max_iters (or num_epochs) to go on")
                return 0
            log.say(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}; saved {ckpt_path}")
            return 0


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
