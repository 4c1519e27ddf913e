"""
Train a GPT-NeoX (Pythia) language model: vanilla, with PonderLM-2 latent thoughts, with PonderLM pondering, or
with one of the papers' baselines (Pause tokens, Loop, hidden-state feedback: config/pythia70m_{pause,loop,hidden}.py).
One process on a CPU or GPU, or several GPUs and nodes with DDP or FSDP2 (nanoponder/parallel.py). The defaults
are the headline run: PonderLM-2 with one thought per token (K=1) on pythia-70m, one epoch of MiniPile.

    python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512 && python train.py config/shakespeare_ponder.py
        # minutes on a CPU: the config reads data/shakespeare-bpe512, which that command writes
    python train.py config/pythia70m_ponder.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/pythia70m_ponder.py   # 8 GPUs, same global batch
    python train.py config/pythia70m_ponder.py --batch_size=4 --gradient_accumulation_steps=32  # less memory
    torchrun --standalone --nproc_per_node=8 train.py config/pythia1.4b_ponder.py --parallelism=fsdp \
        --activation_checkpointing=True                               # sharded: models DDP cannot fit
    python train.py config/pythia70m_ponder.py --init_from=resume     # go on from out_dir/ckpt.pt, exactly
    python train.py config/pythia70m_ponder.py --init_from=EleutherAI/pythia-70m --out_dir=out-cont  # continue
        # training a Hugging Face checkpoint: the architecture comes from its config.json, the method
        # (n_thoughts, n_ponder, ...) and block_size from this config
    nohup python train.py config/pythia70m_ponder.py > train.log 2>&1 &   # a plain line per log_interval
    python train.py --help                                            # every config key and its value

gradient_accumulation_steps counts micro-batches over all processes: with N GPUs each does 1/N of them.
Several nodes: README.md, "Beyond one GPU". A memory plan per GPU is printed before training (nanoponder/cost.py).
An out_dir belongs to one run: a new run into an out_dir that holds a checkpoint stops with an error
(resume it, or --overwrite=True: the old run's files go once the new run has passed its checks), and a lock
file (out_dir/train.lock) refuses a second concurrent run.
Ctrl-C or SIGTERM saves out_dir/ckpt.pt at the end of the current iteration, then exits with 130 or 143;
checkpoints are written atomically, so a kill keeps the previous one. Exit codes: nanoponder/runtime.py.
"""

import math
import os
import signal
import time
from dataclasses import asdict, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist

from configurator import known_config
from model import GPT, METHOD_COUNTS, GPTConfig
from nanoponder.checkpoint import Checkpoint, load_hf_model, model_from_weights, resolve_init_from
from nanoponder.cost import flops_per_token, plan_memory
from nanoponder.data import TrainBatches, ValBatches, max_token_id, open_blocks
from nanoponder.parallel import (PARALLELISMS, all_ranks_agree, clip_gradients, full_state, gather_dtype,
                                 load_optimizer_state, local_tensors, set_gradient_sync, setup_distributed,
                                 teardown_distributed, wrap)
from nanoponder.runlog import RunLog, SilentLog
from nanoponder.runtime import (DirectoryLock, UserError, autocast, compile_blocks, failure, human, keep_freed_memory,
                                move_into_place, one_line, remove_stale_temp_files, resolve_device, resolve_dtype,
                                run_cli, temp_path, write_result)
from nanoponder.tokenizer import tokenizer_mismatch, tokenizer_record

# -----------------------------------------------------------------------------
# config: plain globals, overridden by config files and --key=value (configurator.py). main() and the checks
# before the run read them; the Run gets a copy, run.cfg, and it and its helpers read only that.
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
data_dir = 'data/minipile'      # train.bin, val.bin, meta.json from prepare_data.py
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
n_ponder = 0                    # PonderLM: pondering steps (0 = off)
ponder_multiply = False         # PonderLM: multiply the first input embeddings by n_ponder
n_pause = 0                     # Pause: K pause slots after every token (0 = off)
pause_token_id = 50288          # Pause: the embedding row of the pause vector, an id the data never holds
n_loop = 0                      # Loop: K extra runs of the layer stack, same weights (0 = off)
n_hidden = 0                    # hidden-state feedback: N steps (0 = off)
scale_embeds = True             # scale the embeddings: sqrt(2.5 H) with thoughts, else sqrt(H) (Loop, Hidden: model.py)
weight_init = 'small'           # 'small' (the papers') or 'normal' (normal(0, 0.02), stock Pythia): model.py
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
    """The signal handler only takes note (a print here could fail on a closed pipe): the loop reports the stop
    and saves."""
    global _stop_signal
    if _stop_signal is None:  # repeats are ignored: torchrun forwards a Ctrl-C as SIGTERM on top of the SIGINT
        _stop_signal = signal.Signals(signum)


def config_dict():
    """The config keys and their values now (after the config files and --key=value)."""
    return {k: globals()[k] for k in _config_keys}


# -----------------------------------------------------------------------------
# the schedule: pure functions of the iteration

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


# -----------------------------------------------------------------------------
# checks before anything is loaded

MAX_ITERS = 10 ** 12  # more than any run does (30 years at 1,000 iterations a second); beyond it, a typo
# the data order and the Jacobi passes R seed a generator with seed * 1_000_003 + epoch or iteration: an int64
MAX_SEED = (2 ** 63 - 1 - MAX_ITERS) // 1_000_003


def check_config():
    """Every config value that can be wrong, checked up front: one UserError naming the key and its range."""
    for name in _config_keys:  # inf (--weight_decay=1e999) or nan would only surface as a divergence
        if isinstance(globals()[name], float) and not math.isfinite(globals()[name]):
            raise UserError(f"{name} must be a finite number, got {globals()[name]}")
    for name in ('batch_size', 'gradient_accumulation_steps', 'block_size', 'eval_interval', 'eval_iters',
                 'log_interval', 'vocab_size'):
        if globals()[name] < 1:
            raise UserError(f"{name} must be >= 1, got {globals()[name]}")
    for name in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'n_layer', 'n_head', 'n_embd', 'num_epochs',
                 'grad_clip', 'weight_decay'):
        if not globals()[name] >= 0:  # `not >=` also catches nan
            raise UserError(f"{name} must be >= 0, got {globals()[name]}")
    for name in ('warmup_ratio', 'min_lr_ratio'):  # shares: of the run, of the peak learning rate
        if not 0 <= globals()[name] <= 1:
            raise UserError(f"{name} must be in [0, 1], got {globals()[name]}")
    if max_iters == 0 and num_epochs == 0:
        raise UserError("max_iters and num_epochs are both 0: set one of them")
    if max_iters > MAX_ITERS:
        raise UserError(f"max_iters must be <= {MAX_ITERS:.0e} (30 years at 1,000 iterations a second), "
                        f"got {max_iters:.3g}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed must be in [0, {MAX_SEED:,}] (seed * 1_000_003 + iteration seeds the data order and "
                        f"the Jacobi passes, and must fit in 63 bits), got {seed}")
    if not 0 < learning_rate < math.inf:
        raise UserError(f"learning_rate must be > 0, got {learning_rate}")
    for name in ('beta1', 'beta2'):
        if not 0 <= globals()[name] < 1:
            raise UserError(f"{name} must be in [0, 1), got {globals()[name]}")
    if not 0 < eps < 1:
        raise UserError(f"eps must be in (0, 1), got {eps}")
    r = tuple(jacobi_train_range)
    if not (len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r) and 0 <= r[0] <= r[1]):
        raise UserError(f"jacobi_train_range must be (lo, hi), two whole numbers with 0 <= lo <= hi, "
                        f"got {jacobi_train_range!r}")
    if not out_dir.strip():
        raise UserError("out_dir is empty: name a directory for the checkpoints, e.g. --out_dir=out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a directory: choose another --out_dir")
    if os.path.realpath(out_dir) == os.path.realpath(data_dir):  # prepare_data.py --overwrite would then mix them
        raise UserError(f"out_dir is the data_dir ({data_dir}): a run's files go in a directory of their own; "
                        f"choose another --out_dir")
    if parallelism not in PARALLELISMS:
        raise UserError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    device_type = resolve_device(device).split(':')[0]
    if resolve_dtype(dtype, device_type) == torch.float16 and parallelism == 'fsdp':
        raise UserError("dtype='float16' with parallelism='fsdp' is not supported (its loss scaling would need "
                        "every shard's overflow check): use --dtype=bfloat16")


def check_out_dir_is_free():
    """A new run (scratch or from a Hugging Face model) must not silently replace a run already in out_dir: its
    ckpt.pt, or a best.pt alone (a run whose ckpt.pt was moved away still has its best model here)."""
    held = [path for path in (os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')) if os.path.exists(path)]
    if init_from != 'resume' and held and not overwrite:
        how = "continue it with --init_from=resume, " if held[0].endswith('ckpt.pt') else ''
        raise UserError(f"{out_dir} already holds a run ({held[0]}): {how}choose another --out_dir, or pass "
                        f"--overwrite=True to start over in it")


# -----------------------------------------------------------------------------
# the model, built from a config cfg: train.py's config keys as attributes (run.cfg)

def model_config(cfg):
    """The GPTConfig that cfg asks for from scratch."""
    shape = {}
    if cfg.model:
        try:
            base = GPTConfig.preset(cfg.model)
        except ValueError as e:
            raise UserError(f"{e}, or model='' with n_layer, n_head and n_embd") from None
        shape = {'n_layer': base.n_layer, 'n_head': base.n_head, 'n_embd': base.n_embd}
    for key in ('n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key):
            shape[key] = getattr(cfg, key)
        elif key not in shape:
            raise UserError(f"model='' needs --{key}=... (> 0), or name a preset such as --model=pythia-70m")
    return make_config(**shape, vocab_size=cfg.vocab_size, scale_embeds=cfg.scale_embeds,
                       weight_init=cfg.weight_init, **method_overrides(cfg))


def make_config(**kwargs):
    try:
        return GPTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        hint = ''
        if sum(kwargs.get(k, 0) > 0 for k in METHOD_COUNTS) > 1 and kwargs.get('n_thoughts') == 1:
            hint = " (train.py's default is PonderLM-2 K=1: pass --n_thoughts=0 for another method)"
        raise UserError(f"bad model config: {e}{hint}") from None


def method_overrides(cfg):
    """The GPTConfig fields cfg sets on any model, also one loaded from Hugging Face."""
    return {'block_size': cfg.block_size, 'n_thoughts': cfg.n_thoughts, 'n_jacobi': cfg.n_jacobi,
            'n_ponder': cfg.n_ponder, 'ponder_multiply': cfg.ponder_multiply, 'n_pause': cfg.n_pause,
            'pause_token_id': cfg.pause_token_id, 'n_loop': cfg.n_loop, 'n_hidden': cfg.n_hidden}


def check_resume_matches(ckpt, path, cfg):
    """The model cfg asks for must be the checkpoint's (else resuming would silently train another)."""
    saved = ckpt.gpt_config()
    if ckpt.pretrained:  # the architecture came from the pretrained model, the method from the config
        wanted = make_config(**{**asdict(saved), **method_overrides(cfg)})
    else:
        wanted = model_config(cfg)
    diff = [f"{f.name} {getattr(saved, f.name)!r} (asked {getattr(wanted, f.name)!r})"
            for f in fields(GPTConfig) if getattr(saved, f.name) != getattr(wanted, f.name)]
    if diff:
        raise UserError(f"checkpoint {path} is a different model: {', '.join(diff)}; resume with the config "
                        f"that made it, or start a new run in another out_dir")
    return saved


def check_resume_data(ckpt, data_dir, meta):
    """The data a run resumes on must be tokenized as the data it was trained on (else the same ids mean other
    text). An old checkpoint or data directory that does not record its tokenizer cannot be checked."""
    mismatch = tokenizer_mismatch(ckpt, data_dir, meta)
    if mismatch:
        raise UserError(f"{mismatch}: resuming would train on ids that mean other text; resume on data prepared "
                        f"with the run's tokenizer, or start a new run in another out_dir")


def build_model(cfg, ckpt_path, data_vocab):
    """-> (raw_model on the CPU, Checkpoint or None, pretrained name or None), per cfg.init_from."""
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    ckpt = None
    if cfg.init_from == 'resume':
        if not os.path.exists(ckpt_path):
            raise UserError(f"init_from=resume but there is no checkpoint {ckpt_path}: train once with "
                            f"--init_from=scratch --out_dir={cfg.out_dir} (it saves ckpt.pt at each evaluation)")
        ckpt = Checkpoint.load(ckpt_path)
        check_pause_token(cfg, data_vocab, ckpt.gpt_config().vocab_size if ckpt.pretrained else cfg.vocab_size)
        raw_model = model_from_weights(check_resume_matches(ckpt, ckpt_path, cfg), ckpt.model)
        pretrained = ckpt.pretrained
    elif cfg.init_from == 'scratch':
        check_pause_token(cfg, data_vocab, cfg.vocab_size)
        raw_model, pretrained = GPT(model_config(cfg)), None
    else:  # a Hugging Face model, by the rule of every script (checkpoint.resolve_init_from)
        kind, source = resolve_init_from(cfg.init_from, cfg.out_dir, "'scratch', 'resume' (out_dir/ckpt.pt), a "
                                         "Hugging Face model directory or a hub id (owner/name)")
        if kind == 'checkpoint':
            raise UserError(f"init_from={cfg.init_from} is a file, taken for a train.py checkpoint: train.py starts "
                            f"from 'scratch' or a Hugging Face model, and goes on with a run by --init_from=resume "
                            f"(with the --out_dir that holds its ckpt.pt)")
        raw_model, pretrained = load_hf_model(source, **method_overrides(cfg)), cfg.init_from
        check_pause_token(cfg, data_vocab, raw_model.config.vocab_size)  # (a row beyond it is refused on load)
    if raw_model.config.vocab_size < data_vocab:
        raise UserError(f"the data's vocabulary ({data_vocab} ids, {cfg.data_dir}/meta.json) is larger than the "
                        f"model's vocab_size {raw_model.config.vocab_size}: raise vocab_size")
    return raw_model, ckpt, pretrained


def check_pause_token(cfg, data_vocab, model_vocab):
    """Pause's vector is the embedding row pause_token_id: it must be a row of the model (< model_vocab) that no
    token of the data is (>= data_vocab), or real tokens would be read as pauses and the pause vector trained as a
    token. Checked before a model of the config's vocab_size is built (its own check would not say what to do)."""
    p = cfg.pause_token_id
    if cfg.n_pause <= 0 or data_vocab <= p < model_vocab:  # (a negative count is the model config's to refuse)
        return
    what = (f"is a token id of the data ({cfg.data_dir}/meta.json: vocab_size {data_vocab})" if 0 <= p < data_vocab
            else f"is no row of the model's embedding (vocab_size {model_vocab})")
    if model_vocab > data_vocab:
        fix = f"choose a free row ({data_vocab}..{model_vocab - 1}), e.g. --pause_token_id={model_vocab - 1}"
    else:
        padded = data_vocab // 8 * 8 + 8  # a few rows more, a multiple of 8
        fix = f"pad vocab_size by a few rows, e.g. --vocab_size={padded}, and set --pause_token_id={padded - 1}"
    raise UserError(f"pause_token_id={p} {what}: the pause vector needs an embedding row that no token uses; {fix}")


# what a resume may change, but then no longer goes on as the uninterrupted run would have
EXACT_RESUME_KEYS = ('seed', 'jacobi_train_range', 'learning_rate', 'min_lr_ratio', 'weight_decay', 'beta1', 'beta2',
                     'eps', 'grad_clip')


def resume_notes(saved, cfg):
    """A note naming what cfg changes against saved, the config of the run that made the checkpoint."""
    changed = [f"{k} {getattr(cfg, k)!r} (the checkpoint's run: {saved[k]!r})"
               for k in EXACT_RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if 'batch_size' in saved and 'gradient_accumulation_steps' in saved:
        was = saved['batch_size'] * saved['gradient_accumulation_steps']
        now = cfg.batch_size * cfg.gradient_accumulation_steps
        if was != now:
            changed.append(f"a global batch of {now} sequences (the checkpoint's run: {was})")
    if not changed:
        return []
    why = " (the seed draws the data order and the Jacobi passes R)" if saved.get('seed', cfg.seed) != cfg.seed else ''
    return [f"note: resuming with {', '.join(changed)}: not an exact resume, the run goes on differently from the "
            f"uninterrupted one{why}"]


def check_token_ids(blocks, model_vocab, data_dir, meta):
    """Every id in the token files must be below the model's vocab_size: token files that do not match their
    meta.json would fail at the batch that holds such an id (an IndexError; on CUDA a device assert), maybe hours
    in."""
    for b in blocks:
        top = max_token_id(b.path)
        if top >= model_vocab:
            raise UserError(f"{b.path} holds token id {top}, but the model's vocab_size is {model_vocab} (and "
                            f"{data_dir}/meta.json says {meta['vocab_size']}): the token files do not match their "
                            f"meta.json; prepare the data again with prepare_data.py")


def make_optimizer(raw_model, cfg, fused):
    """AdamW; weight decay on the 2-D weights (matmuls and embeddings), none on biases and LayerNorms."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
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
            _, loss = net(x, y)
        total += loss.float()
    net.train()
    if distributed:
        dist.all_reduce(total)
    return total.item() / (n_batches * world_size)


# -----------------------------------------------------------------------------
# the run

class Run:
    """One training run's state and its steps: an iteration, an evaluation with its checkpoint, a log line.
    train_loop reads as the sequence of these steps. cfg: the run's config (train.py's keys as attributes)."""

    def __init__(self, cfg, distributed, rank, world_size, device_str):
        self.cfg = cfg
        self.distributed, self.rank, self.world_size, self.device = distributed, rank, world_size, device_str
        self.master = rank == 0  # rank 0 logs and writes the checkpoints
        device_type = device_str.split(':')[0]
        keep_freed_memory(device_type)  # a CPU step reuses last step's memory, no page faults (see there)
        self.ptdtype = resolve_dtype(cfg.dtype, device_type)
        self.ctx = autocast(device_type, self.ptdtype)
        self.accum = cfg.gradient_accumulation_steps // world_size  # micro-batches per iteration of this process
        self.mean_jacobi = sum(cfg.jacobi_train_range) / 2  # the mean R of training: its FLOPs per token
        self.open_data(device_str)
        self.data_tokenizer = tokenizer_record(cfg.data_dir, self.meta)  # read once; every checkpoint carries it
        self.ckpt_path, self.best_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'best.pt')
        self.raw_model, ckpt, self.pretrained = build_model(cfg, self.ckpt_path, self.meta['vocab_size'])
        check_token_ids((self.train_batches.blocks, self.val_batches.blocks), self.raw_model.config.vocab_size,
                        cfg.data_dir, self.meta)
        self.notes = resume_notes(ckpt.config or {}, cfg) if ckpt is not None else []
        if self.data_tokenizer['json'] is None and self.data_tokenizer['name'] != 'gpt2':  # gpt2: its name is all
            self.notes.append(f"note: the tokenizer of {cfg.data_dir} cannot be loaded (meta.json's tokenizer: "
                              f"{self.data_tokenizer['name']}, no tokenizer.json), so the checkpoints carry none: "
                              f"sample.py, eval.py and export_hf.py will need --tokenizer=PATH")
        if ckpt is not None:
            check_resume_data(ckpt, cfg.data_dir, self.meta)
        self.raw_model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            compile_blocks(self.raw_model)  # per Block: the same graphs for every number of thought passes
        self.net = wrap(self.raw_model, cfg.parallelism, device_str, self.ptdtype)  # fsdp: raw_model is now sharded
        self.eval_net = getattr(self.net, 'module', self.net)  # DDP's module: evaluation needs no gradient sync
        self.optimizer = make_optimizer(self.raw_model, cfg, fused=device_type in ('cuda', 'cpu'))  # one kernel
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.ptdtype == torch.float16)  # fp16: loss scaling
        self.plan_schedule()
        self.iter_num, self.epoch, self.position, self.best_val_loss = 0, 0, 0, math.inf
        if ckpt is not None:
            self.restore(ckpt, device_type)
        self.start_iter = self.iter_num
        self.best_saved_loss = self.best_val_loss  # the val loss of best.pt (a resumed run's best was saved)
        self.epoch, self.position = self.train_batches.normalize(self.epoch, self.position)
        # a resumed run does not redo the evaluation at its checkpoint's iteration: that one is already in its log
        self.evaluated_at = self.saved_at = self.start_iter if cfg.init_from == 'resume' else None

    def open_data(self, device_str):
        cfg = self.cfg
        train_blocks, val_blocks, self.meta = open_blocks(cfg.data_dir, cfg.block_size, device_str)
        self.train_batches = TrainBatches(train_blocks, cfg.batch_size, self.accum, self.rank, self.world_size,
                                          cfg.seed)
        self.val_batches = ValBatches(val_blocks, cfg.batch_size, self.rank, self.world_size)
        if self.train_batches.iters_per_epoch == 0:
            raise UserError(f"the batch is larger than the data: one iteration reads "
                            f"{self.train_batches.blocks_per_iter} blocks of {cfg.block_size + 1} tokens (batch_size x "
                            f"gradient_accumulation_steps) but {train_blocks.path} holds {train_blocks.n_blocks}: "
                            f"lower batch_size, gradient_accumulation_steps or block_size")

    def plan_schedule(self):
        cfg = self.cfg
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.total_iters = cfg.max_iters or max(1, round(cfg.num_epochs * self.train_batches.iters_per_epoch))
        if self.total_iters > MAX_ITERS:
            raise UserError(f"num_epochs={cfg.num_epochs:g} is {self.total_iters:.3g} iterations of this data, more "
                            f"than {MAX_ITERS:.0e} (30 years at 1,000 iterations a second): lower num_epochs")
        self.warmup = cfg.warmup_iters or round(cfg.warmup_ratio * self.total_iters)
        self.decay_end = cfg.lr_decay_iters or self.total_iters

    def restore(self, ckpt, device_type):
        load_optimizer_state(self.raw_model, self.optimizer, ckpt.optimizer)  # the model's weights are loaded
        self.scaler.load_state_dict(ckpt.scaler)
        self.iter_num, self.best_val_loss = ckpt.iter_num, ckpt.best_val_loss
        self.epoch, self.position = ckpt.data_state['epoch'], ckpt.data_state['position']
        torch.set_rng_state(ckpt.rng['cpu'])
        if 'cuda' in ckpt.rng and device_type == 'cuda':
            torch.cuda.set_rng_state(ckpt.rng['cuda'], self.device)

    # --- the steps ---

    def due_for_eval(self):
        return (self.iter_num % self.cfg.eval_interval == 0 or self.iter_num >= self.total_iters) \
            and self.iter_num != self.evaluated_at

    def one_iteration(self, X, Y):
        """Accumulate gradients over the micro-batches, then one optimizer step. X, Y: this iteration's first
        micro-batch; returns the next iteration's first, read ahead while the accelerator works."""
        cfg = self.cfg
        lr = lr_at(self.iter_num, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, self.warmup, self.decay_end)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        R = None
        if self.raw_model.config.n_thoughts:
            R = jacobi_passes(cfg.seed, self.iter_num, *cfg.jacobi_train_range)
        next_epoch, next_position = self.train_batches.next_iteration(self.epoch, self.position)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.accum):
            set_gradient_sync(self.net, micro_step == self.accum - 1)  # reduce only in the last backward
            with self.ctx:
                loss = self.net(X, Y, n_jacobi=R)[1]  # (not keeping the logits alive through backward)
            loss = loss / self.accum  # the gradient of the iteration's mean loss
            if micro_step + 1 < self.accum:
                X, Y = self.train_batches.get(self.epoch, self.position, micro_step + 1)
            else:
                X, Y = self.train_batches.get(next_epoch, next_position, 0)
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
        grad_norm = None
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_gradients(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        self.epoch, self.position = next_epoch, next_position
        return X, Y, {'loss': loss_sum, 'lr': lr, 'R': R, 'grad_norm': grad_norm}

    def sync_loss_and_stop(self, loss_sum):
        """The one sync per iteration: the loss over all ranks (logging, NaN check) and whether any rank got a
        stop signal (all must stop at the same step, or the others would wait for it forever)."""
        stats = torch.stack([loss_sum.float(), torch.tensor(float(_stop_signal is not None), device=self.device)])
        if self.distributed:
            dist.all_reduce(stats)
        loss, stop_votes = stats.tolist()
        loss /= self.world_size
        if not math.isfinite(loss):
            raise self.divergence("loss", loss)
        return loss, stop_votes > 0

    def evaluate(self, log):
        """Evaluate; rank 0 logs it; save a checkpoint (also best.pt on a new best). Every rank has the same
        val loss, so all take the same decision (fsdp needs all of them to gather the state)."""
        loss = val_loss(self.eval_net, self.val_batches, self.cfg.eval_iters, self.ctx, self.distributed,
                        self.world_size)
        self.evaluated_at = self.iter_num
        if not math.isfinite(loss):
            raise self.divergence("val loss", loss)
        improved = loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, loss)
        if self.master:
            ppl = math.exp(loss) if loss < 700 else math.inf
            log.say(f"iter {self.iter_num}: val loss {loss:.4f}, perplexity {ppl:.2f}" + (" (best)" if improved else ""))
            log.record({'iter': self.iter_num, 'val_loss': loss, 'val_ppl': ppl, 'best_val_loss': self.best_val_loss,
                        'tokens': self.iter_num * self.tokens_per_iter})
        # a checkpoint at iteration start_iter would only repeat the starting point
        if self.iter_num > self.start_iter and (improved or self.cfg.always_save_checkpoint
                                                or self.iter_num >= self.total_iters):
            # best.pt is the best of the checkpoints saved: the unsaved start (iteration 0) may have been the best
            best = loss < self.best_saved_loss or not os.path.exists(self.best_path)
            self.save(also_best=best)
            if best:
                self.best_saved_loss = loss

    def save(self, also_best=False):
        """Every rank: out_dir/ckpt.pt (and best.pt), one file written atomically by rank 0 with the whole
        model and optimizer state (gathered under fsdp); never a model that is no longer finite."""
        if not all_ranks_agree(all(bool(torch.isfinite(p).all()) for p in local_tensors(self.raw_model)),
                               self.distributed):
            raise self.divergence("a parameter", 'not finite')
        model_state, optimizer_state = full_state(self.raw_model, self.optimizer)  # fsdp: {} on ranks > 0
        if self.master:
            rng = {'cpu': torch.get_rng_state()}
            if self.device.startswith('cuda'):
                rng['cuda'] = torch.cuda.get_rng_state(self.device)
            Checkpoint(model_args=asdict(self.raw_model.config), model=model_state,
                       optimizer=optimizer_state, scaler=self.scaler.state_dict(), iter_num=self.iter_num,
                       data_state={'epoch': self.epoch, 'position': self.position}, rng=rng,
                       best_val_loss=self.best_val_loss, config=vars(self.cfg), pretrained=self.pretrained,
                       tokenizer=self.data_tokenizer,
                       ).save(self.ckpt_path)
            if also_best:
                link_best(self.ckpt_path, self.best_path)
        self.saved_at = self.iter_num

    def divergence(self, what, value):
        kept = f"the last good checkpoint {self.ckpt_path} is kept" if self.saved_at is not None else "no checkpoint was saved yet"
        return failure(f"{what} is {value} at iteration {self.iter_num}: training diverged; {kept}. "
                       f"Lower learning_rate (now {self.cfg.learning_rate:g}) or check the data")


def link_best(ckpt_path, best_path):
    """best.pt = the checkpoint just saved. A hard link costs no time or disk, and keeps this version when
    ckpt.pt is later replaced by a new file; a copy where the file system has no links."""
    try:
        os.link(ckpt_path, temp_path(best_path))
    except OSError:
        with open(ckpt_path, 'rb') as src, write_result(best_path) as dst:
            dst.write(src.read())
        return
    move_into_place(best_path)


def summary(run):
    """The run in a few lines, printed before training."""
    cfg, config, blocks = run.cfg, run.raw_model.config, run.train_batches.blocks
    source = f"{run.pretrained} (its architecture)" if run.pretrained else cfg.model or 'custom'
    lo, hi = cfg.jacobi_train_range
    method = config.method_label + (f", R in {lo}..{hi} in training, {config.n_jacobi} in eval"
                                    if config.n_thoughts else '')
    plan = plan_memory(config, cfg.batch_size, cfg.block_size, n_jacobi=max(cfg.jacobi_train_range),
                       dtype=run.ptdtype, parallelism=cfg.parallelism, world_size=run.world_size, grad_accum=run.accum,
                       activation_checkpointing=cfg.activation_checkpointing,
                       gather_dtype=gather_dtype(cfg.parallelism, run.device, run.ptdtype),
                       device_type=torch.device(run.device).type)
    return [
        f"model: {source} {config.n_layer}L/{config.n_head}H/{config.n_embd}d, {method}; "
        f"{human(run.raw_model.get_num_params())} non-embedding params "
        f"({human(run.raw_model.get_num_params(False))} total)",
        f"data: {cfg.data_dir}, {human(blocks.n_blocks * cfg.block_size)} train tokens in {blocks.n_blocks:,} blocks "
        f"of {cfg.block_size}, {run.train_batches.iters_per_epoch:,} iterations per epoch",
        f"batch: {cfg.batch_size} x {run.accum} accumulation x {run.world_size} process(es) = "
        f"{cfg.batch_size * cfg.gradient_accumulation_steps} sequences = {run.tokens_per_iter:,} tokens per iteration",
        f"schedule: {run.total_iters:,} iterations ({run.total_iters / run.train_batches.iters_per_epoch:.2f} epochs, "
        f"{human(run.total_iters * run.tokens_per_iter)} tokens), lr {cfg.learning_rate:g}, warmup {run.warmup}, "
        f"cosine to {cfg.learning_rate * cfg.min_lr_ratio:g} at {run.decay_end}"
        + (f"; resuming at {run.start_iter}" if run.start_iter else ''),
        f"FLOPs/token: {flops_per_token(config, run.mean_jacobi, training=True):.3g} training, "
        f"{flops_per_token(config, config.n_jacobi, training=False):.3g} eval; device {run.device}, "
        f"{str(run.ptdtype).removeprefix('torch.')}, compile={cfg.compile}, parallelism: "
        f"{cfg.parallelism if run.distributed else 'none (one process)'}",
        plan.summary()] + schedule_notes(run) + run.notes


def schedule_notes(run):
    """What a schedule that is legal but probably not meant does (a smoke test's short run may mean it)."""
    cfg = run.cfg
    if run.warmup >= run.total_iters:
        return [f"note: the warmup ({run.warmup} iterations) is as long as the run ({run.total_iters}) or longer: "
                f"the learning rate never reaches its peak {cfg.learning_rate:g} and never decays"]
    if run.decay_end <= run.warmup:
        return [f"note: lr_decay_iters={cfg.lr_decay_iters} is not after the warmup ({run.warmup} iterations): the "
                f"learning rate drops from the warmup straight to {cfg.learning_rate * cfg.min_lr_ratio:g}"]
    return []


# -----------------------------------------------------------------------------
# main's steps: claim out_dir, build the run, open the log, train

def claim_out_dir(master, distributed):
    """Rank 0 makes out_dir its own: no run to overwrite, no other run in it (the lock), no stale temp files.
    Returns the lock (None on other ranks). Every rank stops if rank 0 cannot."""
    lock, problem = None, None
    if master:
        try:
            check_out_dir_is_free()
            os.makedirs(out_dir, exist_ok=True)
            lock = DirectoryLock(out_dir)
            lock.acquire()
            for name in remove_stale_temp_files(out_dir):
                print(f"note: removed {os.path.join(out_dir, name)}, left by a save that was killed")
        except (UserError, OSError) as e:
            problem = e
    if not all_ranks_agree(problem is None, distributed):
        if isinstance(problem, OSError):
            raise UserError(f"cannot use out_dir {out_dir!r}: {one_line(problem)}")
        raise problem or UserError("rank 0 could not claim out_dir")  # other ranks: rank 0 says why
    return lock


# what a run writes into its out_dir, and the results eval.py writes beside its checkpoint by default
RUN_FILES = ('ckpt.pt', 'best.pt', 'metrics.jsonl', 'loss.png', 'eval.json', 'eval_jacobi.png', 'eval_tasks.json')


def remove_previous_run():
    """--overwrite=True starts over: all of the old run's files go, not only the ckpt.pt that the first save
    replaces (a stop before the first new best would leave the old best.pt beside the new run). -> their names."""
    removed = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    for name in removed:
        os.remove(os.path.join(out_dir, name))
    return removed


def open_log(run):
    """Rank 0's log (metrics.jsonl, loss.png, stdout, wandb), which starts with the run's summary."""
    cfg = run.cfg
    resumed_at = run.start_iter if cfg.init_from == 'resume' else None
    log = RunLog(cfg.out_dir, run, cfg.log_interval, resumed_at, start_wandb(cfg))
    for line in summary(run):
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


def train_loop(run, log):
    """Train until total_iters or a stop signal, evaluating on the way; the exit code (0, or 130 / 143)."""
    X, Y = run.train_batches.get(run.epoch, run.position, 0)  # the first micro-batch; later ones are read ahead
    stop = False
    while True:
        if run.due_for_eval():  # the first time at iteration 0, the last at the end
            run.evaluate(log)
        if run.iter_num >= run.total_iters or stop:
            break
        t0 = time.time()
        X, Y, stats = run.one_iteration(X, Y)
        stats['loss'], stop = run.sync_loss_and_stop(stats['loss'])
        log.iteration_done(run, stats, time.time() - t0)
    if run.saved_at != run.iter_num:
        run.save()
    if stop:
        log.say(f"stopped by {_stop_signal.name if _stop_signal else 'a signal to another rank'} at iteration "
                f"{run.iter_num}; saved {run.ckpt_path}: go on with --init_from=resume")
        return 128 + (_stop_signal or signal.SIGTERM)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if run.start_iter >= run.total_iters:  # a resume of a finished run: say so instead of "saved"
        log.say(f"nothing to train: {run.ckpt_path} is at iteration {run.start_iter}, the schedule ends at "
                f"{run.total_iters}; raise --max_iters (or num_epochs) to go on")
        return 0
    log.say(f"done: {run.iter_num} iterations, best val loss {run.best_val_loss:.4f}; saved {run.ckpt_path}")
    return 0


# -----------------------------------------------------------------------------

def main():
    """Check the config, claim out_dir, build the run and train it; the exit code (0, or 130 / 143 after a
    signal). Whatever happens, the log is closed, the lock released and the process group left."""
    check_config()
    distributed, rank, world_size, device_str = setup_distributed(resolve_device(device), gradient_accumulation_steps)
    made_out_dir = rank == 0 and not os.path.exists(out_dir)
    lock = log = None
    finished = False
    try:
        lock = claim_out_dir(rank == 0, distributed)
        run = Run(SimpleNamespace(**config_dict()), distributed, rank, world_size, device_str)
        if run.master and overwrite and init_from != 'resume':  # only now: a command that fails its checks keeps them
            removed = remove_previous_run()
            if removed:
                run.notes.append(f"note: --overwrite=True: removed the previous run's {', '.join(removed)} "
                                 f"from {out_dir}")
        if run.master:
            log = open_log(run)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        code = train_loop(run, log or SilentLog())
        finished = True
        return code
    except torch.OutOfMemoryError:
        raise failure(f"out of GPU memory with batch_size={batch_size}: lower it and raise "
                      f"gradient_accumulation_steps by the same factor (same global batch)") from None
    finally:
        if log:
            log.close()
        if lock:
            lock.release()
            if made_out_dir and not os.listdir(out_dir):  # a command that failed its checks leaves no empty out_dir
                os.rmdir(out_dir)
        if distributed:
            teardown_distributed(finished)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
