"""
Train a GPT-NeoX (Pythia) language model: vanilla, with PonderLM-2 latent thoughts, or with PonderLM pondering.
One process on a CPU or GPU, or several GPUs with DDP. The defaults are the headline run: PonderLM-2 with one
thought per token (K=1) on pythia-70m, one epoch of MiniPile.

    python prepare_data.py --dataset=shakespeare && python train.py config/shakespeare_ponder.py  # minutes, CPU
    python train.py config/pythia70m_ponder.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/pythia70m_ponder.py   # 8 GPUs, same global batch
    python train.py config/pythia70m_ponder.py --batch_size=4 --gradient_accumulation_steps=32  # less memory
    python train.py config/pythia70m_ponder.py --init_from=resume     # go on from out_dir/ckpt.pt, exactly
    python train.py config/pythia70m_ponder.py --init_from=EleutherAI/pythia-70m --out_dir=out-cont  # continue
        # training a Hugging Face checkpoint: the architecture comes from its config.json, the method
        # (n_thoughts, n_ponder, ...) and block_size from this config
    python train.py --help                                            # every config key and its value

gradient_accumulation_steps counts micro-batches over all processes: with N GPUs each does 1/N of them.
Ctrl-C or SIGTERM saves out_dir/ckpt.pt at the end of the current iteration and exits (torchrun kills its
workers 30 s after a Ctrl-C; checkpoints are written atomically, so the previous one survives that).
"""

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config: plain globals, overridden by config files and --key=value (configurator.py)
# I/O
out_dir = 'out'
eval_interval = 500             # iterations between evaluations (each may save a checkpoint)
eval_iters = 40                 # val batches per evaluation and process
log_interval = 10
always_save_checkpoint = True   # save ckpt.pt at every evaluation, not only on a new best val loss
init_from = 'scratch'           # 'scratch', 'resume' (out_dir/ckpt.pt) or a Hugging Face model name/directory
wandb_log = False
wandb_project = 'nanoPonder'
wandb_run_name = 'pythia70m-ponder'
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
n_head = 0
n_embd = 0
vocab_size = 50304              # must be >= the data's vocab_size (meta.json)
n_thoughts = 1                  # PonderLM-2: K latent thoughts per token (0 = off)
n_jacobi = 3                    # PonderLM-2: Jacobi passes in evaluation
jacobi_train_range = (2, 4)     # PonderLM-2: R drawn uniformly from lo..hi per training iteration
n_ponder = 0                    # PonderLM: pondering steps (0 = off)
ponder_multiply = False         # PonderLM: multiply the first input embeddings by n_ponder
scale_embeds = True             # scale input embeddings (sqrt(2.5 H) with thoughts, sqrt(H) otherwise)
init = 'ponder'                 # 'ponder' (the papers' init) or 'pythia' (stock normal(0.02))
# AdamW
learning_rate = 1e-3            # peak
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # max gradient norm; 0 disables clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr_ratio * learning_rate
warmup_ratio = 0.01             # warmup as a share of max_iters ...
warmup_iters = 0                # ... unless this is > 0
lr_decay_iters = 0              # end of the cosine; 0 -> max_iters
min_lr_ratio = 0.1
# system
device = 'auto'                 # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                  # 'auto' (bfloat16 autocast on CUDA, float32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = True                  # torch.compile the model (minutes of compiling, then faster steps)
seed = 1337
_config_keys = [k for k, v in globals().items()
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, type(None)))]
# -----------------------------------------------------------------------------

# GPTConfig fields that a run from a pretrained Hugging Face checkpoint takes from this config; the rest
# (the architecture) comes from the checkpoint's config.json
_SET_ON_PRETRAINED = ('block_size', 'n_thoughts', 'n_jacobi', 'jacobi_train_range', 'n_ponder', 'ponder_multiply')

_stop_signal = None  # name of the signal that asked us to stop; the loop saves and exits at the next step boundary


class TrainError(Exception):
    """A reason to stop that the user can act on; printed as one `error: ...` line, without a traceback."""


def request_stop(signum, frame):
    global _stop_signal
    if _stop_signal is None:  # repeats are ignored: torchrun forwards a Ctrl-C as SIGTERM on top of the SIGINT
        _stop_signal = signal.Signals(signum).name
        if os.environ.get('RANK', '0') == '0':
            tqdm.write(f"{_stop_signal}: saving a checkpoint at the end of this iteration, then exiting")


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(obj, path):
    """torch.save obj to path atomically: into a temp file in the same directory, flushed to disk, then renamed
    over path. A crash or kill midway leaves the previous file intact (and the temp file is removed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def link_best(ckpt_path, best_path):
    """best.pt = the checkpoint just saved. A hard link costs no time or disk, and keeps this version when
    ckpt.pt is later replaced by a new file; a copy where the file system has no links."""
    tmp = f"{best_path}.tmp{os.getpid()}"
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, best_path)


def checkpoint_dict(raw_model, optimizer, scaler, iter_num, data_state, best_val_loss, pretrained):
    """Everything a resume needs, as tensors and plain Python values only (torch.load(weights_only=True))."""
    state = {k.removeprefix('_orig_mod.'): v for k, v in raw_model.state_dict().items()}
    rng = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available() and raw_model.embed_in.weight.is_cuda:
        rng['cuda'] = torch.cuda.get_rng_state(raw_model.embed_in.weight.device)
    return {
        'model_args': asdict(raw_model.config),
        'model': state,
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'iter_num': iter_num,
        'data_state': data_state,  # {'epoch', 'position'}: where the next iteration reads
        'rng': rng,
        'best_val_loss': best_val_loss,
        'config': {k: globals()[k] for k in _config_keys},
        'pretrained': pretrained,  # the Hugging Face model this run started from, or None
    }


def params_finite(raw_model):
    return all(bool(torch.isfinite(p).all()) for p in raw_model.parameters())


def load_resume_checkpoint(path):
    if not os.path.exists(path):
        raise TrainError(f"init_from=resume but there is no checkpoint {path}: train once with "
                         f"--init_from=scratch --out_dir={out_dir} (it saves {os.path.basename(path)} at each evaluation)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    missing = {'model_args', 'model', 'optimizer', 'scaler', 'iter_num', 'data_state', 'rng', 'best_val_loss'} - set(ckpt)
    if missing:
        raise TrainError(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))})")
    return ckpt


# -----------------------------------------------------------------------------
# data

class PackedBlocks:
    """A token file (uint16) cut into packed blocks of block_size + 1 tokens: block i is tokens
    [i*T, i*T + T], the inputs its first T, the targets its last T. Documents are concatenated with an EOS
    after each, so a block spans document boundaries, as in the papers' (GPT-NeoX) packing."""

    def __init__(self, path, block_size, device):
        self.path, self.block_size, self.device = path, block_size, device
        self.n_blocks = (os.path.getsize(path) // 2 - 1) // block_size
        self.pin = device.startswith('cuda')

    def read(self, block_ids):
        """block_ids: list of B ints -> x, y (B, T) int64 on the device."""
        # a fresh memmap per batch: a long-lived one keeps every page it ever touched mapped (nanoGPT's fix)
        data = np.memmap(self.path, dtype=np.uint16, mode='r')
        T = self.block_size
        batch = torch.from_numpy(np.stack([data[i * T:i * T + T + 1] for i in block_ids]).astype(np.int64))
        if self.pin:  # pinned host memory lets the copy run asynchronously with the GPU's work
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)


class TrainBatches:
    """Which blocks a micro-batch reads: a pure function of (epoch, position, micro_step), so a resumed run
    reads exactly what an uninterrupted one would have. Each epoch visits the blocks in a permutation seeded by
    (seed, epoch); an iteration takes the next blocks_per_iter entries of it, of which micro-step m of rank r
    gets the batch_size at offset (m * world_size + r) * batch_size: ranks read disjoint blocks, and one process
    with accumulation reads the same blocks per iteration as several processes sharing it. position counts the
    blocks of the epoch used so far; an epoch ends when a whole iteration no longer fits (the rest is skipped)."""

    def __init__(self, blocks, batch_size, accum_steps, rank, world_size, seed):
        self.blocks, self.batch_size, self.rank, self.world_size, self.seed = blocks, batch_size, rank, world_size, seed
        self.blocks_per_iter = batch_size * accum_steps * world_size
        self.iters_per_epoch = blocks.n_blocks // self.blocks_per_iter
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.blocks.n_blocks, generator=g)
        return self._perm

    def get(self, epoch, position, micro_step):
        start = position + (micro_step * self.world_size + self.rank) * self.batch_size
        return self.blocks.read(self.permutation(epoch)[start:start + self.batch_size].tolist())

    def normalize(self, epoch, position):
        """The (epoch, position) where an iteration starting at (epoch, position) really starts."""
        if position + self.blocks_per_iter > self.blocks.n_blocks:
            return epoch + 1, 0
        return epoch, position

    def next_iteration(self, epoch, position):
        return self.normalize(epoch, position + self.blocks_per_iter)


class ValBatches:
    """The first blocks of val.bin in order (wrapping around if val is small): every evaluation reads the same
    tokens, so val losses are comparable across evaluations and runs. Ranks read disjoint batches."""

    def __init__(self, blocks, batch_size, rank, world_size):
        self.blocks, self.batch_size, self.rank, self.world_size = blocks, batch_size, rank, world_size

    def get(self, k):
        start = (k * self.world_size + self.rank) * self.batch_size
        return self.blocks.read([(start + j) % self.blocks.n_blocks for j in range(self.batch_size)])


def open_data(device_str):
    """Check data_dir and return (train blocks, val blocks, meta dict)."""
    if not os.path.isdir(data_dir):
        raise TrainError(f"data_dir {data_dir!r} does not exist: make it with prepare_data.py "
                         f"(e.g. python prepare_data.py --dataset=shakespeare) or pass --data_dir=...")
    paths = {name: os.path.join(data_dir, name) for name in ('train.bin', 'val.bin', 'meta.json')}
    for path in paths.values():
        if not os.path.isfile(path):
            raise TrainError(f"{path} is missing: data_dir must hold train.bin, val.bin and meta.json from prepare_data.py")
    try:
        with open(paths['meta.json']) as f:
            meta = json.load(f)
        meta['vocab_size'] = int(meta['vocab_size'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"cannot read vocab_size from {paths['meta.json']}: {type(e).__name__}: {e}")
    if meta.get('dtype', 'uint16') != 'uint16':
        raise TrainError(f"{paths['meta.json']} says dtype {meta['dtype']!r}; train.py reads uint16 token files")
    blocks = {}
    for split in ('train', 'val'):
        path = paths[f'{split}.bin']
        size = os.path.getsize(path)
        if size % 2:
            raise TrainError(f"{path} has an odd size ({size} bytes): not a uint16 token file, or cut short")
        blocks[split] = PackedBlocks(path, block_size, device_str)
        if blocks[split].n_blocks == 0:
            raise TrainError(f"{path} has {size // 2} tokens, fewer than one block of block_size + 1 = "
                             f"{block_size + 1}: lower block_size or use more data")
    return blocks['train'], blocks['val'], meta


# -----------------------------------------------------------------------------
# model

def make_config(**kwargs):
    try:
        return GPTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise TrainError(f"bad model config: {e}")


def config_from_globals():
    """The GPTConfig that this run's config asks for (from scratch)."""
    shape = {}
    if model:
        try:
            base = GPTConfig.preset(model)
        except ValueError as e:
            raise TrainError(f"{e}, or model='' with n_layer, n_head and n_embd")
        shape = {'n_layer': base.n_layer, 'n_head': base.n_head, 'n_embd': base.n_embd}
    for key, value in (('n_layer', n_layer), ('n_head', n_head), ('n_embd', n_embd)):
        if value:
            shape[key] = value
        elif key not in shape:
            raise TrainError(f"model='' needs --{key}=... (> 0), or name a preset such as --model=pythia-70m")
    return make_config(**shape, vocab_size=vocab_size, scale_embeds=scale_embeds, init=init,
                       **method_settings())


def method_settings():
    return {'block_size': block_size, 'n_thoughts': n_thoughts, 'n_jacobi': n_jacobi,
            'jacobi_train_range': tuple(jacobi_train_range), 'n_ponder': n_ponder, 'ponder_multiply': ponder_multiply}


def check_resume_matches(ckpt, path):
    """The model this command asks for must be the checkpoint's (else resuming would silently train another)."""
    saved = make_config(**ckpt['model_args'])
    if ckpt.get('pretrained'):  # the architecture came from the pretrained model, the method from the config
        wanted = make_config(**{**asdict(saved), **method_settings()})
    else:
        wanted = config_from_globals()
    diff = [f"{f.name} {getattr(saved, f.name)!r} (asked {getattr(wanted, f.name)!r})"
            for f in fields(GPTConfig) if getattr(saved, f.name) != getattr(wanted, f.name)]
    if diff:
        raise TrainError(f"checkpoint {path} is a different model: {', '.join(diff)}; resume with the config "
                         f"that made it, or start a new run in another out_dir")
    return saved


def make_optimizer(raw_model, fused):
    """AdamW; weight decay on the 2-D weights (matmuls and embeddings), none on biases and LayerNorms."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused)


def lr_at(it, warmup, decay_end):
    """Learning rate of iteration it (0-based): linear warmup, cosine down to min_lr_ratio * peak, then flat."""
    min_lr = learning_rate * min_lr_ratio
    if it < warmup:
        return learning_rate * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    progress = (it - warmup) / (decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate(net, val_batches, autocast, ddp, world_size):
    """Mean val loss over eval_iters batches of every rank, in eval mode (PonderLM-2: config n_jacobi passes)."""
    net.eval()
    total = torch.zeros((), device=val_batches.blocks.device)
    for k in range(eval_iters):
        x, y = val_batches.get(k)
        with autocast:
            _, loss = net(x, y)
        total += loss.float()
    net.train()
    if ddp:
        dist.all_reduce(total)
    return total.item() / (eval_iters * world_size)


# -----------------------------------------------------------------------------
# logging

class RunLog:
    """Rank 0's record: out_dir/metrics.jsonl (one JSON object per line), the loss curve out_dir/loss.png
    and, if asked, Weights & Biases."""

    def __init__(self, resumed_at=None):
        self.path = os.path.join(out_dir, 'metrics.jsonl')
        self.entries = []
        if resumed_at is not None and os.path.exists(self.path):
            # keep what happened up to the checkpoint; the lines after it belong to the part about to be redone
            with open(self.path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line cut short by a crash
                        continue
                    if entry.get('iter', math.inf) <= resumed_at:
                        self.entries.append(entry)
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(e) + '\n' for e in self.entries)
        os.replace(tmp, self.path)
        self.no_matplotlib = False
        self.wandb = None
        if wandb_log:
            try:
                import wandb
            except ImportError:
                raise TrainError("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
            wandb.init(project=wandb_project, name=wandb_run_name, config={k: globals()[k] for k in _config_keys})
            self.wandb = wandb

    def log(self, entry):
        self.entries.append(entry)
        with open(self.path, 'a') as f:
            f.write(json.dumps(entry) + '\n')
        if self.wandb:
            self.wandb.log({k: v for k, v in entry.items() if k != 'iter' and v is not None}, step=entry['iter'])

    def plot(self):
        """Redraw out_dir/loss.png: train loss per log step and val loss per evaluation."""
        try:
            import matplotlib
            matplotlib.use('Agg')  # files only, no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            if not self.no_matplotlib:
                tqdm.write("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
                self.no_matplotlib = True
            return
        train = [(e['iter'], e['loss']) for e in self.entries if 'loss' in e]
        val = [(e['iter'], e['val_loss']) for e in self.entries if 'val_loss' in e]
        fig, ax = plt.subplots(figsize=(8, 5))
        if train:
            ax.plot(*zip(*train), label='train', alpha=0.7)
        if val:
            ax.plot(*zip(*val), 'o-', label='val')
        ax.set_xlabel('iteration')
        ax.set_ylabel('loss (nats/token)')
        ax.set_title(os.path.basename(os.path.abspath(out_dir)))
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(out_dir, 'loss.png')
        fig.savefig(path + '.tmp', format='png', dpi=100)
        plt.close(fig)
        os.replace(path + '.tmp', path)


def human(n):
    for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe_method(config):
    if config.n_thoughts:
        lo, hi = config.jacobi_train_range
        return f"PonderLM-2, {config.n_thoughts} thought(s)/token, R in {lo}..{hi} in training, {config.n_jacobi} in eval"
    if config.n_ponder:
        return f"PonderLM, {config.n_ponder} pondering steps"
    return "vanilla"


# -----------------------------------------------------------------------------

def check_config():
    """Cheap checks of the config values, before anything is loaded."""
    for name in ('batch_size', 'gradient_accumulation_steps', 'block_size', 'eval_interval', 'eval_iters', 'log_interval'):
        if globals()[name] < 1:
            raise TrainError(f"{name} must be >= 1, got {globals()[name]}")
    for name in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'n_layer', 'n_head', 'n_embd', 'num_epochs',
                 'warmup_ratio', 'min_lr_ratio', 'grad_clip', 'weight_decay'):
        if globals()[name] < 0:
            raise TrainError(f"{name} must be >= 0, got {globals()[name]}")
    if max_iters == 0 and num_epochs == 0:
        raise TrainError("max_iters and num_epochs are both 0: set one of them")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise TrainError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if len(tuple(jacobi_train_range)) != 2:
        raise TrainError(f"jacobi_train_range must be (lo, hi), got {jacobi_train_range!r}")


def setup_device():
    """-> (ddp, rank, local_rank, world_size, device string). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    ddp = 'RANK' in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if dev.startswith('cuda'):
        if not torch.cuda.is_available():
            raise TrainError(f"device={device!r} but CUDA is not available here: use --device=cpu")
        if ddp:
            dev = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(dev)
    if gradient_accumulation_steps % world_size:
        raise TrainError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by "
                         f"the number of processes ({world_size})")
    if ddp:
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
    return ddp, rank, local_rank, world_size, dev


def main():
    check_config()
    ddp, rank, local_rank, world_size, device_str = setup_device()
    try:
        train(ddp, rank, local_rank, world_size, device_str)
    finally:
        if ddp:
            dist.destroy_process_group()


def autocast_context(device_type):
    """Mixed precision: weights and optimizer state stay fp32, autocast runs the matmuls in bf16/fp16."""
    ptdtype = {'auto': torch.bfloat16 if device_type == 'cuda' and torch.cuda.is_bf16_supported() else torch.float32,
               'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    if ptdtype == torch.float16 and device_type != 'cuda':
        raise TrainError("dtype='float16' needs CUDA (its loss scaling); use bfloat16 or float32")
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    return ptdtype, autocast


def build_model(ckpt_path, data_vocab):
    """-> (raw_model on the CPU, checkpoint dict or None, pretrained name or None), per init_from."""
    torch.manual_seed(seed)  # every rank builds the same initial weights
    ckpt, pretrained = None, None
    if init_from == 'resume':
        ckpt = load_resume_checkpoint(ckpt_path)
        config = check_resume_matches(ckpt, ckpt_path)
        pretrained = ckpt.get('pretrained')
    elif init_from == 'scratch':
        config = config_from_globals()
    else:
        pretrained = init_from
        try:
            raw_model = GPT.from_pretrained(init_from, **method_settings())
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise TrainError(f"cannot load init_from={init_from!r} (not 'scratch', 'resume' or a loadable Hugging "
                             f"Face model): {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        config = raw_model.config
    if config.vocab_size < data_vocab:
        raise TrainError(f"the data's vocabulary ({data_vocab} ids, {data_dir}/meta.json) is larger than the "
                         f"model's vocab_size {config.vocab_size}: raise vocab_size")
    if init_from == 'resume':
        raw_model = GPT.from_state_dict(config, ckpt['model'])
    elif init_from == 'scratch':
        raw_model = GPT(config)
    return raw_model, ckpt, pretrained


def print_summary(raw_model, pretrained, train_batches, accum, world_size, schedule, start_iter, device_str, ptdtype):
    config, blocks = raw_model.config, train_batches.blocks
    total_iters, warmup, decay_end = schedule
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    source = f"{pretrained} (its architecture)" if pretrained else model or 'custom'
    print(f"model: {source} {config.n_layer}L/{config.n_head}H/{config.n_embd}d, {describe_method(config)}; "
          f"{human(raw_model.get_num_params())} non-embedding params ({human(raw_model.get_num_params(False))} total)")
    print(f"data: {data_dir}, {human(blocks.n_blocks * block_size)} train tokens in {blocks.n_blocks:,} blocks "
          f"of {block_size}, {train_batches.iters_per_epoch:,} iterations per epoch")
    print(f"batch: {batch_size} x {accum} accumulation x {world_size} process(es) = "
          f"{batch_size * gradient_accumulation_steps} sequences = {tokens_per_iter:,} tokens per iteration")
    print(f"schedule: {total_iters:,} iterations ({total_iters / train_batches.iters_per_epoch:.2f} epochs, "
          f"{human(total_iters * tokens_per_iter)} tokens), lr {learning_rate:g}, warmup {warmup}, cosine to "
          f"{learning_rate * min_lr_ratio:g} at {decay_end}" + (f"; resuming at {start_iter}" if start_iter else ''))
    print(f"FLOPs/token: {raw_model.flops_per_token(training=True):.3g} training, "
          f"{raw_model.flops_per_token(training=False):.3g} eval; device {device_str}, "
          f"{str(ptdtype).removeprefix('torch.')}, compile={compile}")


def divergence_error(what, value, iter_num, ckpt_path, saved):
    kept = f"the last good checkpoint {ckpt_path} is kept" if saved else "no checkpoint was saved yet"
    return TrainError(f"{what} is {value} at iteration {iter_num}: training diverged; {kept}. "
                      f"Lower learning_rate (now {learning_rate:g}) or check the data")


def train(ddp, rank, local_rank, world_size, device_str):
    master = rank == 0  # rank 0 logs and saves
    device_type = device_str.split(':')[0]
    accum = gradient_accumulation_steps // world_size  # micro-batches per iteration of this process
    ptdtype, autocast = autocast_context(device_type)

    train_blocks, val_blocks, meta = open_data(device_str)
    train_batches = TrainBatches(train_blocks, batch_size, accum, rank, world_size, seed)
    val_batches = ValBatches(val_blocks, batch_size, rank, world_size)
    if train_batches.iters_per_epoch == 0:
        raise TrainError(f"the batch is larger than the data: one iteration reads {train_batches.blocks_per_iter} "
                         f"blocks of {block_size + 1} tokens (batch_size x gradient_accumulation_steps) but "
                         f"{train_blocks.path} holds {train_blocks.n_blocks}: lower batch_size, "
                         f"gradient_accumulation_steps or block_size")

    ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
    raw_model, ckpt, pretrained = build_model(ckpt_path, meta['vocab_size'])
    config = raw_model.config
    raw_model.to(device_str)
    optimizer = make_optimizer(raw_model, fused=device_type == 'cuda')
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)  # fp16 only: loss scaling

    # iterations and learning rate schedule
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    total_iters = max_iters or max(1, round(num_epochs * train_batches.iters_per_epoch))
    warmup = warmup_iters or round(warmup_ratio * total_iters)
    decay_end = lr_decay_iters or total_iters

    iter_num, epoch, position, best_val_loss = 0, 0, 0, math.inf
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        epoch, position = ckpt['data_state']['epoch'], ckpt['data_state']['position']
        torch.set_rng_state(ckpt['rng']['cpu'])
        if 'cuda' in ckpt['rng'] and device_type == 'cuda':
            torch.cuda.set_rng_state(ckpt['rng']['cuda'], device_str)
        ckpt = None  # free the host copy of the weights and optimizer state
    start_iter = iter_num
    epoch, position = train_batches.normalize(epoch, position)

    if master:
        print_summary(raw_model, pretrained, train_batches, accum, world_size, (total_iters, warmup, decay_end),
                      start_iter, device_str, ptdtype)
        os.makedirs(out_dir, exist_ok=True)  # only now: a run that fails its checks leaves out_dir as it was
        run_log = RunLog(resumed_at=start_iter if init_from == 'resume' else None)

    net = raw_model  # what the loop calls: maybe compiled, maybe wrapped in DDP
    if compile:
        net = torch.compile(net)
    if ddp:
        # the rope tables are the only buffers and every rank computes the same ones: no need to broadcast
        net = DDP(net, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)
    eval_net = net.module if ddp else net  # evaluation needs no gradient sync

    def save(also_best=False):
        if not params_finite(raw_model):  # never replace a good checkpoint with a broken model
            raise divergence_error("a parameter", 'not finite', iter_num, ckpt_path, saved_at is not None)
        data_state = {'epoch': epoch, 'position': position}
        save_checkpoint(checkpoint_dict(raw_model, optimizer, scaler, iter_num, data_state, best_val_loss,
                                        pretrained), ckpt_path)
        if also_best:
            link_best(ckpt_path, best_path)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    X, Y = train_batches.get(epoch, position, 0)  # the first micro-batch; later ones are read ahead
    # a resumed run does not redo the evaluation at its checkpoint's iteration: that one is already in its log
    evaluated_at = saved_at = start_iter if init_from == 'resume' else None
    stop_now = False
    window_time, window_iters = 0.0, 0  # training time and iterations since the last log line
    with tqdm(total=total_iters, initial=iter_num, disable=not master, dynamic_ncols=True, unit='it') as bar:
        while True:
            # evaluate: the first time at iteration 0, the last at the end
            if (iter_num % eval_interval == 0 or iter_num >= total_iters) and iter_num != evaluated_at:
                val_loss = evaluate(eval_net, val_batches, autocast, ddp, world_size)
                if not math.isfinite(val_loss):
                    raise divergence_error("val loss", val_loss, iter_num, ckpt_path, saved_at is not None)
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if master:
                    ppl = math.exp(val_loss) if val_loss < 700 else math.inf
                    tqdm.write(f"iter {iter_num}: val loss {val_loss:.4f}, perplexity {ppl:.2f}"
                               + (" (best)" if improved else ""))
                    run_log.log({'iter': iter_num, 'val_loss': val_loss, 'val_ppl': ppl, 'best_val_loss': best_val_loss,
                                 'tokens': iter_num * tokens_per_iter})
                    run_log.plot()
                    # a checkpoint at iteration start_iter would only repeat the starting point
                    if iter_num > start_iter and (improved or always_save_checkpoint or iter_num >= total_iters):
                        save(also_best=improved)
                        saved_at = iter_num
            if iter_num >= total_iters:
                if master and saved_at != iter_num:
                    save()
                if master:
                    tqdm.write(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}; saved {ckpt_path}")
                return
            if stop_now:
                if master and saved_at != iter_num:
                    save()
                if master:
                    tqdm.write(f"stopped by {_stop_signal or 'a signal to another rank'} at iteration {iter_num}; "
                               f"saved {ckpt_path}: go on with --init_from=resume")
                return

            # one iteration: accumulate gradients over the micro-batches, then one optimizer step
            t0 = time.time()
            lr = lr_at(iter_num, warmup, decay_end)
            for group in optimizer.param_groups:
                group['lr'] = lr
            # PonderLM-2's Jacobi passes R: a pure function of (seed, iteration), the same on every rank and resume
            R = raw_model.draw_n_jacobi(seed, iter_num) if config.n_thoughts else None
            next_epoch, next_position = train_batches.next_iteration(epoch, position)
            loss_sum = torch.zeros((), device=device_str)
            for micro_step in range(accum):
                if ddp:  # all-reduce the gradients only once, in the last micro-step's backward
                    net.require_backward_grad_sync = micro_step == accum - 1
                with autocast:
                    _, loss = net(X, Y, n_jacobi=R)
                loss = loss / accum  # the gradient of the iteration's mean loss
                # read the next micro-batch on the CPU while the accelerator works through this one
                if micro_step + 1 < accum:
                    X, Y = train_batches.get(epoch, position, micro_step + 1)
                else:
                    X, Y = train_batches.get(next_epoch, next_position, 0)
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
            grad_norm = None
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            epoch, position = next_epoch, next_position

            # the one sync per iteration: the loss over all ranks (logging, NaN check) and whether any rank got a
            # stop signal (all must stop at the same step, or the others would wait for it forever)
            stats = torch.stack([loss_sum.float(), torch.tensor(float(_stop_signal is not None), device=device_str)])
            if ddp:
                dist.all_reduce(stats)
            loss_val, stop_votes = stats.tolist()
            loss_val /= world_size
            stop_now = stop_votes > 0
            if not math.isfinite(loss_val):
                raise divergence_error("loss", loss_val, iter_num, ckpt_path, saved_at is not None)
            window_time += time.time() - t0
            window_iters += 1
            bar.update(1)

            if iter_num % log_interval == 0 and master:
                tokens_per_sec = window_iters * tokens_per_iter / window_time
                mfu = raw_model.estimate_mfu(tokens_per_sec / world_size)  # per GPU; None on a CPU
                run_log.log({'iter': iter_num, 'loss': loss_val, 'lr': lr, 'tokens_per_sec': tokens_per_sec,
                             'mfu': mfu, 'R': R, 'grad_norm': None if grad_norm is None else grad_norm.item(),
                             'epoch': iter_num / train_batches.iters_per_epoch})
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                                mfu='n/a' if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
                window_time, window_iters = 0.0, 0


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        main()
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print(f"error: out of GPU memory with batch_size={batch_size}: lower it and raise gradient_accumulation_steps "
              f"by the same factor (same global batch)", file=sys.stderr)
        sys.exit(1)
