"""
A prepared data directory: its token files and meta.json (the batches cut from it: nanoponder/batches.py).

A data directory holds {train,val,test}.bin (no test.bin if prepared before there were test splits): every
document's ids followed by the EOS id, concatenated, as uint16; and meta.json:
    dataset, source, tokenizer ('pythia', 'gpt2', 'bpe:N' or an absolute tokenizer.json path), tokenizer_file
    ('tokenizer.json', a copy inside the directory, or null for gpt2), tokenizer_sha256 (the tokenizer's
    identity, Tokenizer.sha256), vocab_size, eos_id, eos_token, val_fraction and seed (how text and Tiny
    Shakespeare were split; null for MiniPile), dtype ('uint16'), tokens {split: count}, documents {split: count}.

    from nanoponder.data import read_meta, read_tokens
    ids = read_tokens('data/shakespeare-bpe512', 'val')      # a read-only uint16 memmap
"""
import hashlib
import json
import os
import re
import shlex

import numpy as np

from nanoponder.runtime import UserError, one_line, temp_file, temp_path

MAX_VOCAB = 2 ** 16  # ids are stored as uint16
TOKEN_DTYPE = np.uint16

# -----------------------------------------------------------------------------
# the data directory: meta.json and the token files

def data_tokenizer_file(data_dir, meta):
    """The tokenizer.json copy of a data directory, or None (gpt2 has none: meta's tokenizer_file is null)."""
    path = os.path.join(data_dir, meta.get('tokenizer_file', 'tokenizer.json') or '')
    return path if os.path.isfile(path) else None


def default_data_dir(dataset, tokenizer):
    """prepare_data.py's out_dir when none is given: data/<dataset>, or data/<dataset>-bpe<N> for a BPE of N ids
    trained on it (so that it never replaces the Pythia-token data)."""
    return os.path.join('data', f'{dataset}-bpe{tokenizer[4:]}' if tokenizer.startswith('bpe:') else dataset)


def default_named(data_dir):
    """(dataset, 'bpe:N' or None) that data_dir's name says if it is one of prepare_data.py's default out_dirs
    (default_data_dir), else None."""
    m = re.fullmatch(r'data/(minipile|shakespeare)(?:-bpe(\d+))?', os.path.normpath(data_dir).replace(os.sep, '/'))
    return (m[1], m[2] and f'bpe:{m[2]}') if m else None


def prepare_command(data_dir, meta=None):
    """The prepare_data.py command that writes data_dir: from its meta.json (meta) when there is one (dataset,
    tokenizer, a local source, how it was split), else from a default out_dir's name (--dataset=text elsewhere)."""
    dataset, tok, source = (meta or {}).get('dataset'), (meta or {}).get('tokenizer'), (meta or {}).get('source')
    if dataset not in ('minipile', 'shakespeare', 'text'):  # no meta.json to go by
        if not default_named(data_dir):
            return f"python prepare_data.py --dataset=text --input=YOUR_TEXT --out_dir={shlex.quote(data_dir)}"
        (dataset, bpe), source = default_named(data_dir), None
        tok = bpe or 'pythia'
    args = [f'--dataset={dataset}']
    if dataset == 'text' or (isinstance(source, str) and dataset == 'shakespeare' and '://' not in source):
        args.append(f'--input={shlex.quote(source)}' if isinstance(source, str) else '--input=YOUR_TEXT')
    if isinstance(tok, str) and tok != 'pythia':
        args.append(f'--tokenizer={shlex.quote(tok)}')
    for key, default_value in (('val_fraction', 0.1), ('seed', 1337), ('eos_token', '<|endoftext|>')):
        value = (meta or {}).get(key)  # None: not recorded (MiniPile's split, data prepared before)
        if value is not None and value != default_value:
            args.append(f'--{key}={shlex.quote(str(value))}')
    if not isinstance(tok, str) or os.path.normpath(data_dir) != default_data_dir(dataset, tok):
        args.append(f'--out_dir={shlex.quote(data_dir)}')
    return 'python prepare_data.py ' + ' '.join(args)


def prepare_again(data_dir, meta):
    """What to run to prepare data_dir again, as it was: its prepare_command with --overwrite=True, and a caveat
    where meta.json predates recording how the held-out part was chosen."""
    caveat = (" (with the --val_fraction and --seed it was first prepared with, if not the defaults)"
              if meta.get('dataset') in ('text', 'shakespeare') and 'val_fraction' not in meta else '')
    return f"`{prepare_command(data_dir, meta)} --overwrite=True`{caveat}"


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


def split_path(data_dir, split, meta=None):
    """data_dir/split.bin, checked to be a whole uint16 file with the tokens that meta.json (meta, if read already)
    counts: a token file cut short or replaced is refused wherever it is read."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
        if split not in ('train', 'val'):  # data prepared before test splits were cut has none
            raise UserError(f"{data_dir} has no {split} split ({path} is missing): prepare it again with "
                            f"{prepare_again(data_dir, meta or read_meta(data_dir))}, which keeps train and its "
                            f"tokenizer, or use --split=val")
        raise UserError(f"{path} is missing: data_dir must hold train.bin, val.bin and meta.json from prepare_data.py")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(f"{path} has an odd size ({size} bytes): not a uint16 token file, or cut short")
    meta = read_meta(data_dir) if meta is None else meta
    counted = (meta.get('tokens') or {}).get(split)
    if isinstance(counted, int) and size // 2 != counted:
        raise UserError(f"{path} holds {size // 2:,} tokens, but {data_dir}/meta.json says {counted:,}: the token "
                        f"file was cut short or replaced; prepare the data again ({prepare_again(data_dir, meta)})")
    return path


def read_tokens(data_dir, split, meta=None):
    """All ids of a split as a read-only uint16 memmap (checked by split_path); an empty split as an empty array."""
    path = split_path(data_dir, split, meta)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode='r') if os.path.getsize(path) else np.zeros(0, TOKEN_DTYPE)


def max_token_id(path):
    """The largest id in a (non-empty) token file: one scan at memory speed, so every id can be checked against a
    model's vocabulary before a run."""
    return int(np.memmap(path, dtype=TOKEN_DTYPE, mode='r').max())
