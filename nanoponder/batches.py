"""
Batches cut from a prepared data directory: the training and validation batches of packed blocks, and the windows
that score every token of a stream of ids once (a prepared split's or a text file's).

    from nanoponder.batches import open_blocks, TrainBatches
    train_blocks, val_blocks, meta = open_blocks('data/shakespeare-bpe512', block_size=128, device='cpu')
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from nanoponder.data import TOKEN_DTYPE, read_meta, read_tokens, split_path
from nanoponder.runtime import UserError, one_line
from nanoponder.tokenizer import data_dir_tokenizer


# -----------------------------------------------------------------------------
# batches for training

class PackedBlocks:
    """A token file cut into packed blocks of block_size + 1 tokens: block i is tokens [i*T, i*T + T], the
    inputs its first T, the targets its last T. Documents are concatenated with an EOS after each, so a block
    spans document boundaries, as in the papers' (GPT-NeoX) packing."""

    def __init__(self, path, block_size, device):
        self.path, self.block_size, self.device = path, block_size, device
        self.n_blocks = (os.path.getsize(path) // 2 - 1) // block_size
        self.pin = device.startswith('cuda')
        if self.n_blocks <= 0:
            raise UserError(f"{path} has {os.path.getsize(path) // 2} tokens, fewer than one block of block_size + 1 "
                            f"= {block_size + 1}: lower block_size or use more data")

    def read(self, block_ids):
        """block_ids: list of B ints -> x, y (B, T) int64 on the device."""
        # a fresh memmap per batch: a long-lived one keeps every page it ever touched mapped (nanoGPT's fix)
        data = np.memmap(self.path, dtype=TOKEN_DTYPE, mode='r')
        T = self.block_size
        batch = torch.from_numpy(np.stack([data[i * T:i * T + T + 1] for i in block_ids]).astype(np.int64))
        if self.pin:  # pinned host memory lets the copy run asynchronously with the GPU's work
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)


def open_blocks(data_dir, block_size, device):
    """Check data_dir and return (train blocks, val blocks, meta dict)."""
    meta = read_meta(data_dir)
    train = PackedBlocks(split_path(data_dir, 'train', meta), block_size, device)
    val = PackedBlocks(split_path(data_dir, 'val', meta), block_size, device)
    return train, val, meta


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

    def block_ids(self, epoch, position, micro_step):
        start = position + (micro_step * self.world_size + self.rank) * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].tolist()

    def get(self, epoch, position, micro_step):
        return self.blocks.read(self.block_ids(epoch, position, micro_step))

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

    def block_ids(self, k):
        start = (k * self.world_size + self.rank) * self.batch_size
        return [(start + j) % self.blocks.n_blocks for j in range(self.batch_size)]

    def get(self, k):
        return self.blocks.read(self.block_ids(k))


# -----------------------------------------------------------------------------
# windows over a stream of ids, for scoring every token once

def sliding_windows(n_tokens, block, stride):
    """Windows (start, end, first) over a stream of n_tokens ids: inputs ids[start:end-1], targets
    ids[start+1:end]; the targets from index `first` on are scored here, the ones before it are context that an
    earlier window scored. Window k starts at k*stride, so every target 1..n_tokens-1 is scored exactly once,
    with at least block - stride tokens of context after the first window."""
    windows, first, start = [], 1, 0
    while first < n_tokens:
        end = min(start + block + 1, n_tokens)
        windows.append((start, end, first))
        first, start = end, start + stride
    return windows


def utf8_bytes(tok, ids):
    """UTF-8 bytes of the text of ids, decoded a document at a time (split at EOS, so no character is cut);
    each EOS counts one byte, as the separator between documents."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tok.eos_id)
    total, begin = len(cuts), 0
    for cut in list(cuts) + [len(ids)]:
        if cut > begin:
            total += len(tok.decode(ids[begin:cut].tolist()).encode('utf-8'))
        begin = cut + 1
    return total


def window_batches(ids, windows, batch_size, device):
    """Yield x, y (B, L) int64 on device: inputs and targets of same-length windows, y = -1 where not scored."""
    by_length = {}
    for w in windows:
        by_length.setdefault(w[1] - w[0], []).append(w)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            rows = [np.asarray(ids[s:e], dtype=np.int64) for s, e, _ in group[i:i + batch_size]]
            batch = torch.from_numpy(np.stack(rows)).to(device)
            x, y = batch[:, :-1], batch[:, 1:].clone()
            for row, (s, _, first) in enumerate(group[i:i + batch_size]):
                y[row, :first - s - 1] = -1  # targets before `first` were scored by an earlier window
            yield x, y


def nats(logits, y):
    """Summed cross-entropy (natural log) of the scored targets y (B, T) under logits (B, T, V), a float."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction='sum').item()


def window_counts(windows):
    counts = {}
    for s, e, _ in windows:
        counts[e - s] = counts.get(e - s, 0) + 1
    return counts


def text_stream(path, tok):
    """A raw text file as token ids: the EOS token (context for the first token, as a new document starts in
    training) and then the text."""
    try:
        with open(path, encoding='utf-8') as f:
            content = f.read()
    except FileNotFoundError:
        raise UserError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text: {one_line(e)}") from None
    ids = tok.encode(content)
    if not ids:
        raise UserError(f"{path} is empty: nothing to score")
    return np.array([tok.eos_id] + ids, dtype=np.int64)


def data_stream(data_dir, split):
    """A prepared split as token ids (documents each followed by EOS, as training reads them) and its tokenizer."""
    ids = read_tokens(data_dir, split, read_meta(data_dir))
    if len(ids) < 2:
        raise UserError(f"{data_dir}/{split}.bin has {len(ids)} tokens: nothing to score")
    return ids, data_dir_tokenizer(data_dir)
