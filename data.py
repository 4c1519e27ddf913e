"""
Tokens in and out: the tokenizers (pythia, gpt2, a tokenizer.json), the prepared data directory that
prepare_data.py writes and train.py, sample.py and eval.py read, and the batches cut from it.

A data directory holds {train,val}.bin (MiniPile also test.bin): every document's ids followed by the EOS id,
concatenated, as uint16; and meta.json:
    dataset, source, tokenizer ('pythia', 'gpt2', 'bpe:N' or an absolute tokenizer.json path), tokenizer_file
    ('tokenizer.json', a copy inside the directory, or null for gpt2), tokenizer_sha256 (the tokenizer's
    identity, Tokenizer.sha256), vocab_size, eos_id, eos_token, dtype ('uint16'), tokens {split: count},
    documents {split: count}.

    from data import load_tokenizer, data_dir_tokenizer, read_tokens, TrainBatches
    tok = data_dir_tokenizer('data/shakespeare')       # the tokenizer that data was made with
    ids = np.memmap('data/shakespeare/val.bin', dtype=np.uint16, mode='r')
"""
import hashlib
import json
import os
import re
import sys

import numpy as np
import torch

from runtime import UserError, failure, one_line, temp_file, temp_path

PYTHIA_REPO = 'EleutherAI/pythia-70m'
MAX_VOCAB = 2 ** 16  # ids are stored as uint16
TOKEN_DTYPE = np.uint16

# -----------------------------------------------------------------------------
# tokenizers


class Tokenizer:
    """encode(text) -> list[int] and decode(ids) -> str, plus name, eos_id, vocab_size, path (the tokenizer.json
    it came from; None for gpt2 and for one a checkpoint carries) and json_text (that tokenizer.json's text; None
    for gpt2)."""

    def __init__(self, name, encode, decode, eos_id, vocab_size, path=None, json_text=None):
        self.name, self.eos_id, self.vocab_size, self.path = name, eos_id, vocab_size, path
        self.encode, self.decode, self.json_text = encode, decode, json_text

    @property
    def sha256(self):
        """Its identity: sha256 of its tokenizer.json (the file's bytes), or of its name for gpt2 (no file)."""
        text = self.json_text if self.json_text is not None else self.name
        return hashlib.sha256(text.encode('utf-8')).hexdigest()

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def hub_offline():
    return os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False')


def pythia_tokenizer_cached():
    """Whether the Pythia tokenizer.json is in the Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(PYTHIA_REPO, 'tokenizer.json'), str)
    except Exception:
        return False


def pythia_tokenizer_path():
    """The GPT-NeoX-20B tokenizer.json every Pythia model uses, from the Hugging Face cache or Hub."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line error
        try:
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json', local_files_only=True)
        except Exception:
            if hub_offline():
                raise
            print(f"fetching tokenizer.json of {PYTHIA_REPO} from the Hugging Face Hub...", file=sys.stderr)
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json', etag_timeout=10)
    except Exception as e:
        raise failure(f"could not get the Pythia tokenizer ({PYTHIA_REPO} tokenizer.json): {one_line(e, 200)}; "
                      f"offline? pass --tokenizer=PATH/to/tokenizer.json") from None


def load_tokenizer_json(path, name, eos_token='<|endoftext|>'):
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')  # bytes, not text mode: the text must be the file's bytes (sha256)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tokenizer {path}: {one_line(e)}") from None
    return tokenizer_from_json(text, name, eos_token, path)


def tokenizer_from_json(text, name, eos_token='<|endoftext|>', path=None):
    """A Tokenizer from the text of a tokenizer.json: the file at path, or (path None) the copy a checkpoint carries."""
    from tokenizers import Tokenizer as HFTokenizer
    where = path or f"{name} (the checkpoint's copy)"
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UserError(f"tokenizer {where} is not valid JSON ({one_line(e)}): it should be a Hugging Face "
                        f"tokenizer.json") from None
    if not isinstance(spec, dict) or 'model' not in spec:
        raise UserError(f"{where} is JSON but not a Hugging Face tokenizer.json (it has no 'model' entry)")
    try:
        tok = HFTokenizer.from_str(text)  # the text as read: no second serialization of a 2 MB file
    except Exception as e:
        raise UserError(f"{where} is not a tokenizer the tokenizers library can read: {one_line(e)}") from None
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise UserError(f"tokenizer {where} has no {eos_token} token; name its end-of-document token with "
                        f"--eos_token=...")
    # the largest id + 1, not the number of entries: added tokens may leave gaps
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    # add_special_tokens=False: no BOS/EOS templates, documents are delimited by us;
    # skip_special_tokens=False: decode must give back everything (special tokens included)
    return Tokenizer(name, lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False), eos_id, vocab_size,
                     path, text)


def load_gpt2_tokenizer():
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise failure(f"tiktoken's gpt2 encoding (downloaded on first use) failed: {one_line(e)}") from None
    # encode_ordinary: a literal '<|endoftext|>' inside a document stays text, not EOS
    return Tokenizer('gpt2', enc.encode_ordinary, lambda ids: enc.decode([int(i) for i in ids]), enc.eot_token,
                     enc.n_vocab)


def load_tokenizer(name_or_path, eos_token='<|endoftext|>'):
    """'pythia', 'gpt2', a tokenizer.json path, or a directory holding one (e.g. a prepared data dir)."""
    if name_or_path == 'gpt2':
        tok = load_gpt2_tokenizer()
    elif name_or_path == 'pythia':
        tok = load_tokenizer_json(pythia_tokenizer_path(), 'pythia', eos_token)
    elif os.path.isfile(name_or_path) or os.path.isfile(os.path.join(name_or_path, 'tokenizer.json')):
        path = name_or_path if os.path.isfile(name_or_path) else os.path.join(name_or_path, 'tokenizer.json')
        path = os.path.abspath(path)
        tok = load_tokenizer_json(path, path, eos_token)
    elif name_or_path.endswith('.json') or os.sep in name_or_path:
        raise UserError(f"tokenizer file not found: {name_or_path}")
    elif bpe_size(name_or_path):
        raise UserError(f"tokenizer {name_or_path} is trained by prepare_data.py and saved with its data: load that "
                        f"data directory's tokenizer.json")
    else:
        raise UserError(f"unknown tokenizer '{name_or_path}' (expected pythia, gpt2 or a path to a tokenizer.json)")
    if tok.vocab_size >= MAX_VOCAB:  # 65535 stays free, so no id can alias a uint16 overflow
        raise UserError(f"tokenizer {name_or_path} has {tok.vocab_size} ids; uint16 token files need fewer "
                        f"than {MAX_VOCAB}")
    return tok


def bpe_size(spec):
    """'bpe:N' -> N, checked; None for any other tokenizer spec."""
    if not spec.startswith('bpe:'):
        return None
    try:
        n = int(spec[len('bpe:'):])
    except ValueError:
        raise UserError(f"tokenizer={spec!r}: write bpe:N with a whole number of ids, e.g. bpe:512") from None
    if not 257 <= n < MAX_VOCAB:
        raise UserError(f"tokenizer={spec!r}: a byte-level BPE needs 257 <= N < {MAX_VOCAB} ids (256 bytes + the "
                        f"end-of-document token + merges)")
    return n


def train_bpe(texts, vocab_size, path, eos_token='<|endoftext|>'):
    """A byte-level BPE with exactly vocab_size ids (eos_token = 0, the 256 bytes, then the merges) trained on texts
    (an iterable of strings); saved as a tokenizer.json at path, which the caller chooses and removes on failure.
    Byte-level: every text round-trips exactly, whatever its characters."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.save(path)
    tok = load_tokenizer_json(path, f'bpe:{vocab_size}', eos_token)
    if tok.vocab_size != vocab_size:  # too little text to learn that many merges
        raise UserError(f"the training text has only enough distinct pairs for {tok.vocab_size} BPE ids, not "
                        f"{vocab_size}: ask for fewer (bpe:{tok.vocab_size}) or give more text")
    return tok


def data_tokenizer_file(data_dir, meta):
    """The tokenizer.json copy of a data directory, or None (gpt2 has none: meta's tokenizer_file is null)."""
    path = os.path.join(data_dir, meta.get('tokenizer_file', 'tokenizer.json') or '')
    return path if os.path.isfile(path) else None


def data_dir_tokenizer(data_dir):
    """The tokenizer a prepared data directory was made with: its tokenizer.json copy, else meta's 'tokenizer'."""
    meta = read_meta(data_dir)
    eos = meta.get('eos_token', '<|endoftext|>')  # prepare_data's --eos_token, if it was changed
    tok_file = data_tokenizer_file(data_dir, meta)
    if tok_file:
        tok = load_tokenizer(tok_file, eos)
        tok.name = meta.get('tokenizer', tok.name)
        return tok
    if not meta.get('tokenizer'):
        raise UserError(f"cannot tell the tokenizer of {data_dir}: no tokenizer.json, and no meta.json naming one; "
                        f"pass --tokenizer=pythia|gpt2|path/to/tokenizer.json")
    return load_tokenizer(meta['tokenizer'], eos)


def tokenizer_record(data_dir, meta):
    """What a checkpoint keeps of its data's tokenizer (Checkpoint.tokenizer), to be used without data_dir: 'json'
    is None when the data directory's tokenizer cannot be loaded (gpt2 has no file: its name is all of it)."""
    try:
        json_text = data_dir_tokenizer(data_dir).json_text
    except UserError:  # e.g. a BPE's tokenizer.json deleted from the data: the caller says what that means
        json_text = None
    return {'name': meta.get('tokenizer'), 'eos_token': meta.get('eos_token', '<|endoftext|>'), 'json': json_text,
            'sha256': meta['tokenizer_sha256']}


def tokenizer_mismatch(ckpt, data_dir, meta):
    """Why data_dir's ids are not the ones the checkpoint was trained on (another tokenizer), or None (the same
    tokenizer, or one of them unknown: data or a checkpoint from before they recorded it)."""
    ours, theirs = (ckpt.tokenizer or {}).get('sha256'), meta.get('tokenizer_sha256')
    if not ours or not theirs or ours == theirs:
        return None
    return (f"{data_dir} was prepared with another tokenizer ({meta.get('tokenizer')}, sha256 {theirs[:12]}) than "
            f"the checkpoint's training data ({ckpt.tokenizer.get('name')}, sha256 {ours[:12]})")


def checkpoint_tokenizer(ckpt):
    """The tokenizer of a train.py checkpoint's training data: the copy it carries, else (a checkpoint saved
    before they carried one) its data directory's."""
    kept = ckpt.tokenizer
    if kept and kept.get('json') is not None:
        return tokenizer_from_json(kept['json'], kept['name'], kept['eos_token'])
    if kept and kept.get('name') == 'gpt2':  # no file to keep: the name is all of it
        return load_tokenizer('gpt2')
    data_dir = checkpoint_data_dir(ckpt)
    why = "its data had no tokenizer.json" if kept else "it was saved by an older train.py"
    if not os.path.isdir(data_dir):
        raise UserError(f"the checkpoint carries no tokenizer ({why}) and its data_dir {data_dir} is gone: pass "
                        f"--tokenizer=PATH (the tokenizer.json it was trained with, or a data directory prepared "
                        f"with it; or pythia, gpt2)")
    try:
        return data_dir_tokenizer(data_dir)
    except UserError as e:
        raise UserError(f"the checkpoint carries no tokenizer ({why}), and its data_dir's: {e}; pass "
                        f"--tokenizer=PATH (the tokenizer.json it was trained with; or pythia, gpt2)") from None


def checkpoint_data_dir(ckpt):
    """The data directory a train.py checkpoint was trained on. A relative data_dir is relative to where
    train.py ran: when it is not there from here, try the repository."""
    data_dir = (ckpt.config or {}).get('data_dir')
    if not data_dir:
        raise UserError("the checkpoint does not record its data_dir; pass --tokenizer=pythia|gpt2|PATH")
    if not os.path.isdir(data_dir):
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_dir)
        data_dir = here if os.path.isdir(here) else data_dir
    return data_dir


def hub_tokenizer_path(repo_id):
    """tokenizer.json of a hub model (from_pretrained has usually cached it already); None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, 'tokenizer.json')
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of the next one: it must come first)
        raise failure(f"could not get tokenizer.json of {repo_id} (offline?); "
                      f"pass --tokenizer=path/to/tokenizer.json") from None
    except EntryNotFoundError:  # the repository has no tokenizer.json
        return None
    except Exception as e:
        raise failure(f"could not get tokenizer.json of {repo_id} ({type(e).__name__}); "
                      f"pass --tokenizer=path/to/tokenizer.json") from None


def model_tokenizer(init_from, ckpt=None, override=''):
    """The tokenizer that goes with a model: override (pythia | gpt2 | a path) if given; for a train.py
    checkpoint the one its training data was prepared with (checkpoint_tokenizer); for a Hugging Face model
    (directory or hub id) the tokenizer.json beside its weights."""
    if override:
        return load_tokenizer(override)
    if ckpt is not None:
        return checkpoint_tokenizer(ckpt)
    path = os.path.join(init_from, 'tokenizer.json') if os.path.isdir(init_from) else hub_tokenizer_path(init_from)
    if path is None or not os.path.isfile(path):
        raise UserError(f"no tokenizer.json beside the weights of {init_from}; pass --tokenizer=pythia "
                        f"(every Pythia-based model uses it) or --tokenizer=path/to/tokenizer.json")
    return load_tokenizer(path)


def safe_decode(tok, ids):
    """Text of ids, leaving out ids the tokenizer does not have: the model's vocabulary is padded (Pythia's
    50304 rows against the tokenizer's 50277 ids), and an untrained padding row can still be sampled."""
    return tok.decode([i for i in ids if i < tok.vocab_size])


# -----------------------------------------------------------------------------
# the data directory: meta.json and the token files

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
    """The largest id in a (non-empty) token file. A scan at memory speed (0.04 s per GB from the page cache,
    measured): cheap enough to check every id against a model's vocabulary before each training run."""
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
