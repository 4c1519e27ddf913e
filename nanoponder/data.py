"""
A prepared data directory (its token files and meta.json), and the training batches cut from it.

A data directory holds {train,val}.bin (MiniPile also test.bin): every document's ids followed by the EOS id,
concatenated, as uint16; and meta.json:
    dataset, source, tokenizer ('pythia', 'gpt2', 'bpe:N' or an absolute tokenizer.json path), tokenizer_file
    ('tokenizer.json', a copy inside the directory, or null for gpt2), tokenizer_sha256 (the tokenizer's
    identity, Tokenizer.sha256), vocab_size, eos_id, eos_token, dtype ('uint16'), tokens {split: count},
    documents {split: count}.

    from nanoponder.data import read_meta, read_tokens, TrainBatches
    ids = read_tokens('data/shakespeare-bpe512', 'val')      # a read-only uint16 memmap
"""
import hashlib
import json
import os
import re

import numpy as np
import torch

from nanoponder.runtime import UserError, one_line, temp_file, temp_path

MAX_VOCAB = 2 ** 16  # ids are stored as uint16
TOKEN_DTYPE = np.uint16

# -----------------------------------------------------------------------------
# the data directory: meta.json and the token files

def data_tokenizer_file(data_dir, meta):
    """The tokenizer.json copy of a data directory, or None (gpt2 has none: meta's tokenizer_file is null)."""
    path = os.path.join(data_dir, meta.get('tokenizer_file', 'tokenizer.json') or '')
    return path if os.path.isfile(path) else None


def prepare_command(data_dir):
    """The prepare_data.py command that writes data_dir: data/<dataset>[-bpe<N>] is its default out_dir for the
    datasets it downloads; any other directory is an --out_dir."""
    m = re.fullmatch(r'data/(minipile|shakespeare)(?:-bpe(\d+))?', os.path.normpath(data_dir).replace(os.sep, '/'))
    if not m:
        return f"python prepare_data.py --dataset=text --input=YOUR_TEXT --out_dir={data_dir}"
    return f"python prepare_data.py --dataset={m[1]}" + (f" --tokenizer=bpe:{m[2]}" if m[2] else '')


def read_meta(data_dir):
    """meta.json of a prepared data directory, checked."""
    path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir!r} is a file, not a data directory: pass --data_dir=... of a directory "
                        f"that prepare_data.py made")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir!r} does not exist: make it with `{prepare_command(data_dir)}`, "
                        f"or pass --data_dir=... of a prepared one")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: a data directory holds train.bin, val.bin and meta.json "
                        f"from prepare_data.py")
    try:
        with open(path) as f:
            meta = json.load(f)
        meta['vocab_size'] = int(meta['vocab_size'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read vocab_size from {path}: {type(e).__name__}: {one_line(e)}") from None
    if meta.get('dtype', 'uint16') != 'uint16':
        raise UserError(f"{path} says dtype {meta['dtype']!r}; the token files must be uint16")
    eos_id = meta.get('eos_id', 0)
    if not 1 <= meta['vocab_size'] < MAX_VOCAB or not (isinstance(eos_id, int) and 0 <= eos_id < meta['vocab_size']):
        raise UserError(f"{path} says vocab_size {meta['vocab_size']} and eos_id {eos_id!r}: it needs 1 <= vocab_size "
                        f"< {MAX_VOCAB} and 0 <= eos_id < vocab_size; prepare the data again with prepare_data.py")
    if 'tokenizer_sha256' not in meta:  # a meta.json from before it recorded it: as Tokenizer.sha256 would be
        tok_file = data_tokenizer_file(data_dir, meta)
        identity = b'gpt2' if meta.get('tokenizer') == 'gpt2' else None
        if tok_file:
            with open(tok_file, 'rb') as f:
                identity = f.read()
        meta['tokenizer_sha256'] = hashlib.sha256(identity).hexdigest() if identity else None
    return meta


def write_token_file(ids_iter, path):
    """Write the concatenated ids (arrays or lists) of ids_iter to path's temp file (runtime.temp_file); return
    (temp path, tokens, documents). The caller renames it into place once every split is written."""
    n_tokens = n_docs = 0
    with temp_file(path) as f:
        for ids in ids_iter:
            f.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
            n_tokens += len(ids)
            n_docs += 1
    return temp_path(path), n_tokens, n_docs


def split_path(data_dir, split):
    """data_dir/split.bin, checked to be a whole uint16 file."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
        if split not in ('train', 'val'):  # only MiniPile comes with a test split
            raise UserError(f"{data_dir} has no {split} split ({path} is missing): use --split=val")
        raise UserError(f"{path} is missing: data_dir must hold train.bin, val.bin and meta.json from prepare_data.py")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(f"{path} has an odd size ({size} bytes): not a uint16 token file, or cut short")
    return path


def read_tokens(data_dir, split):
    """All ids of a split as a read-only uint16 memmap."""
    return np.memmap(split_path(data_dir, split), dtype=TOKEN_DTYPE, mode='r')


def max_token_id(path):
    """The largest id in a (non-empty) token file: one scan at memory speed, so every id can be checked against a
    model's vocabulary before a run."""
    return int(np.memmap(path, dtype=TOKEN_DTYPE, mode='r').max())


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
    train = PackedBlocks(split_path(data_dir, 'train'), block_size, device)
    val = PackedBlocks(split_path(data_dir, 'val'), block_size, device)
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


def window_counts(windows):
    counts = {}
    for s, e, _ in windows:
        counts[e - s] = counts.get(e - s, 0) + 1
    return counts
