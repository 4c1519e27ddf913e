"""
Tokenize a corpus into flat uint16 token files for training (each document's ids, then the EOS id).

    python prepare_data.py                                  # MiniPile (Hugging Face datasets) -> data/minipile
    python prepare_data.py --dataset=shakespeare            # downloads Tiny Shakespeare -> data/shakespeare
    python prepare_data.py --dataset=shakespeare --input=../shared/data/tinyshakespeare.txt \\
        --tokenizer=../shared/data/pythia_tokenizer.json    # offline
    python prepare_data.py --dataset=text --input=my_corpus/ --out_dir=data/mine --val_fraction=0.05
    python prepare_data.py --dataset=text --input='books/**/*.txt' --tokenizer=gpt2 --num_proc=4

Writes out_dir/{train,val}.bin (MiniPile also test.bin) and meta.json:
    dataset, source, tokenizer ('pythia', 'gpt2' or an absolute tokenizer.json path), tokenizer_file
    ('tokenizer.json', a copy inside out_dir, or null for gpt2), vocab_size, eos_id, eos_token,
    dtype ('uint16'), tokens {split: count}, documents {split: count}.
load_data_tokenizer(out_dir) gives back the tokenizer (encode, decode, eos_id, vocab_size, name).
Read a split with np.memmap(os.path.join(out_dir, 'train.bin'), dtype=np.uint16, mode='r').

--dataset=text: --input is a .txt file, a directory (all *.txt below it) or a glob; each file is one
document and a val_fraction of the documents is held out (of a single file: its tail, cut at a line).
"""
import glob
import json
import os
import random
import shutil
import sys
import urllib.request

import numpy as np
from tqdm import tqdm

# -----------------------------------------------------------------------------
dataset = 'minipile'    # minipile | shakespeare | text
input = ''              # text: file, directory or glob of .txt files; shakespeare: a local copy (no download)
tokenizer = 'pythia'    # pythia | gpt2 | path/to/tokenizer.json
out_dir = ''            # default: data/<dataset>
val_fraction = 0.1      # text/shakespeare: share of the documents (or of a single text) held out for val
seed = 1337             # which documents go to val
num_proc = min(8, os.cpu_count() or 1)
eos_token = '<|endoftext|>'  # tokenizer.json tokenizers: the token that ends every document
# -----------------------------------------------------------------------------

MINIPILE = 'JeanKaddour/minipile'
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
PYTHIA_REPO = 'EleutherAI/pythia-70m'
MAX_VOCAB = 2 ** 16  # ids are stored as uint16


class DataError(Exception):
    """A problem with the user's input; reported as one `error:` line."""


class Tokenizer:
    """encode(text) -> list[int] and decode(ids) -> str, plus name, eos_id, vocab_size and path
    (the tokenizer.json it came from, None for gpt2)."""

    def __init__(self, name, encode, decode, eos_id, vocab_size, path=None):
        self.name, self.eos_id, self.vocab_size, self.path = name, eos_id, vocab_size, path
        self.encode, self.decode = encode, decode

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def pythia_tokenizer_path():
    """The GPT-NeoX-20B tokenizer.json every Pythia model uses, from the Hugging Face cache or Hub."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line error
        try:
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json', local_files_only=True)
        except Exception:
            print(f"fetching tokenizer.json of {PYTHIA_REPO} from the Hugging Face Hub...", file=sys.stderr)
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json')
    except Exception as e:
        raise DataError(f"could not get the Pythia tokenizer ({PYTHIA_REPO} tokenizer.json): {one_line(e)}; "
                        f"offline? pass --tokenizer=PATH/to/tokenizer.json") from None


def load_tokenizer_json(path, name, eos_token='<|endoftext|>'):
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:
        raise DataError(f"could not read tokenizer {path}: {one_line(e)}") from None
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise DataError(f"tokenizer {path} has no {eos_token} token; name its end-of-document token with "
                        f"--eos_token=...")
    # the largest id + 1, not the number of entries: added tokens may leave gaps
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    # add_special_tokens=False: no BOS/EOS templates, documents are delimited by us;
    # skip_special_tokens=False: decode must give back everything (special tokens included)
    return Tokenizer(name, lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False), eos_id, vocab_size,
                     path)


def load_gpt2_tokenizer():
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise DataError(f"tiktoken's gpt2 encoding (downloaded on first use) failed: {one_line(e)}") from None
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
        raise DataError(f"tokenizer file not found: {name_or_path}")
    else:
        raise DataError(f"unknown tokenizer '{name_or_path}' (expected pythia, gpt2 or a path to a tokenizer.json)")
    if tok.vocab_size >= MAX_VOCAB:  # 65535 stays free, so no id can alias a uint16 overflow
        raise DataError(f"tokenizer {name_or_path} has {tok.vocab_size} ids; uint16 token files need fewer than {MAX_VOCAB}")
    return tok


def load_data_tokenizer(data_dir):
    """The tokenizer a prepared data directory was made with (its copied tokenizer.json when there is one)."""
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    tok_file, eos = meta.get('tokenizer_file'), meta.get('eos_token', '<|endoftext|>')
    if tok_file and os.path.isfile(os.path.join(data_dir, tok_file)):
        tok = load_tokenizer(os.path.join(data_dir, tok_file), eos)
        tok.name = meta['tokenizer']
        return tok
    return load_tokenizer(meta['tokenizer'], eos)


def one_line(text):
    return ' '.join(str(text).split())


# ----------------------------------------------------------------------------- reading documents

def find_text_files(path):
    """A .txt file, every *.txt below a directory, or the files a glob matches; sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, '**', '*.txt'), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no .txt files in directory {path}")
        return files
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no files match {path}")
        return files
    raise DataError(f"input not found: {path}")


def read_text(path):
    # newline='' keeps \r\n as it is, so the token files decode back to the exact bytes
    try:
        with open(path, encoding='utf-8', newline='') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def split_at_line(text, val_fraction):
    """(train, val) with train + val == text, cut at the line break nearest after (1 - val_fraction)."""
    cut = int(len(text) * (1 - val_fraction))
    i = text.find('\n', cut)
    if i == -1 or i + 1 >= len(text):
        i = text.rfind('\n', 0, cut)  # the only break after the cut ends the text: cut earlier
    if i == -1:
        raise DataError("cannot split a single document into train and val: it has no line break before its "
                        "last line; give several files or more text")
    return text[:i + 1], text[i + 1:]


def split_documents(docs, val_fraction, seed):
    """Hold out a random val_fraction of the documents (at least one); both keep the original order."""
    if len(docs) == 1:
        train, val = split_at_line(docs[0], val_fraction)
        return {'train': [train], 'val': [val]}
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise DataError(f"val_fraction={val_fraction} leaves no training documents out of {len(docs)}")
    val_idx = set(random.Random(seed).sample(range(len(docs)), n_val))
    return {'train': [d for i, d in enumerate(docs) if i not in val_idx],
            'val': [d for i, d in enumerate(docs) if i in val_idx]}


def text_documents(path):
    docs = [read_text(f) for f in find_text_files(path)]  # no progress bar: errors must stay one stderr line
    docs = [d for d in docs if d]  # an empty file is not a document
    if not docs:
        raise DataError(f"no text in {path}")
    return docs


def shakespeare_text(path):
    if path:  # a local copy
        if not os.path.isfile(path):
            raise DataError(f"input not found: {path}")
        return read_text(path)
    print(f"downloading {SHAKESPEARE_URL}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            return r.read().decode('utf-8')
    except Exception as e:
        raise DataError(f"could not download Tiny Shakespeare: {one_line(e)}; "
                        f"offline? pass --input=PATH/to/input.txt") from None


def minipile_splits():
    """{'train', 'val', 'test'} -> Hugging Face datasets with a 'text' column."""
    try:
        from datasets import load_dataset
        ds = load_dataset(MINIPILE)
    except Exception as e:
        raise DataError(f"could not load {MINIPILE}: {one_line(e)}") from None
    return {'train': ds['train'], 'val': ds['validation'], 'test': ds['test']}


# ----------------------------------------------------------------------------- tokenizing and writing

_tokenizers = {}  # per process: (spec, eos_token) -> Tokenizer, so workers load theirs once


def cached_tokenizer(spec, eos_token):
    if (spec, eos_token) not in _tokenizers:
        _tokenizers[(spec, eos_token)] = load_tokenizer(spec, eos_token)
    return _tokenizers[(spec, eos_token)]


class DocumentEncoder:
    """Picklable text -> uint16 ids + EOS. It carries only the tokenizer's spec (name or tokenizer.json
    path), so sending it to worker processes is cheap; each process loads the tokenizer once."""

    def __init__(self, tok, eos_token):
        self.spec, self.eos_token = tok.path or tok.name, eos_token
        _tokenizers.setdefault((self.spec, eos_token), tok)  # forked workers inherit it loaded

    def __call__(self, text):
        tok = cached_tokenizer(self.spec, self.eos_token)
        return np.array(tok.encode(text) + [tok.eos_id], dtype=np.uint16)

    def encode_batch(self, batch):
        """For datasets.map(batched=True): {'text': [...]} -> {'ids': [...]}."""
        return {'ids': [self(text) for text in batch['text']]}


def encode_texts(docs, encoder, num_proc, desc):
    """Yield each document's ids in order, tokenized by a pool of num_proc processes."""
    if num_proc <= 1 or len(docs) <= 1:
        yield from tqdm(map(encoder, docs), total=len(docs), desc=desc, unit='doc')
        return
    import multiprocessing
    chunk = max(1, min(64, len(docs) // (num_proc * 8)))
    with multiprocessing.Pool(min(num_proc, len(docs))) as pool:
        yield from tqdm(pool.imap(encoder, docs, chunksize=chunk), total=len(docs), desc=desc, unit='doc')


def encode_hf_dataset(ds, encoder, num_proc, desc):
    """Yield each row's ids of a Hugging Face dataset with a 'text' column, tokenized with dataset.map."""
    ds = ds.map(encoder.encode_batch, batched=True, remove_columns=ds.column_names, num_proc=max(1, num_proc),
                desc=f'tokenizing {desc}').with_format('numpy')
    batches = ds.iter(batch_size=1024)
    for batch in tqdm(batches, total=(len(ds) + 1023) // 1024, desc=f'writing {desc}', unit='batch'):
        yield from batch['ids']


def write_tokens_tmp(ids_iter, out_dir, name):
    """Write the concatenated ids to a temporary file in out_dir; return (tmp path, tokens, documents)."""
    tmp = os.path.join(out_dir, f'.{name}.bin.{os.getpid()}.tmp')
    n_tokens = n_docs = 0
    try:
        with open(tmp, 'wb') as f:
            for ids in ids_iter:
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                n_tokens += len(ids)
                n_docs += 1
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, n_tokens, n_docs


def write_json(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


def copy_tokenizer(tok, out_dir):
    """Copy a tokenizer.json into out_dir so the data directory is self-contained."""
    if tok.path is None:
        return None
    dest = os.path.join(out_dir, 'tokenizer.json')
    if not (os.path.exists(dest) and os.path.samefile(tok.path, dest)):
        shutil.copyfile(tok.path, dest + '.tmp')
        os.replace(dest + '.tmp', dest)
    return 'tokenizer.json'


def prepare(dataset, input='', tokenizer='pythia', out_dir='', val_fraction=0.1, seed=1337, num_proc=1,
            eos_token='<|endoftext|>'):
    """Read, tokenize and write one dataset (arguments as the config globals above);
    return the meta dict also written to out_dir/meta.json."""
    if dataset not in ('minipile', 'shakespeare', 'text'):
        raise DataError(f"unknown dataset '{dataset}' (expected minipile, shakespeare or text)")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    # read everything first: bad input must fail before anything in out_dir is touched
    if dataset == 'shakespeare':
        source = os.path.abspath(input) if input else SHAKESPEARE_URL
        train, val = split_at_line(shakespeare_text(input), val_fraction)
        splits = {'train': [train], 'val': [val]}
    elif dataset == 'text':
        if not input:
            raise DataError("--dataset=text needs --input=PATH (a .txt file, a directory or a glob)")
        source, splits = os.path.abspath(input), split_documents(text_documents(input), val_fraction, seed)
    tok = load_tokenizer(tokenizer, eos_token)
    print(f"tokenizer: {tok.name} (vocab_size {tok.vocab_size}, eos_id {tok.eos_id})")
    if dataset == 'minipile':  # the big download comes after the quick checks
        source, splits = MINIPILE, minipile_splits()

    out_dir = out_dir or os.path.join('data', dataset)
    os.makedirs(out_dir, exist_ok=True)
    encoder = DocumentEncoder(tok, eos_token)
    written = {}  # split -> (tmp file, tokens, documents); no real file is replaced until all are complete
    try:
        for name, docs in splits.items():
            ids = (encode_texts(docs, encoder, num_proc, name) if isinstance(docs, list)
                   else encode_hf_dataset(docs, encoder, num_proc, name))
            written[name] = write_tokens_tmp(ids, out_dir, name)
    except BaseException:
        for tmp, _, _ in written.values():
            os.unlink(tmp)
        raise

    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new meta.json lands, the old one must not vouch for new bins
    for name, (tmp, _, _) in written.items():
        os.replace(tmp, os.path.join(out_dir, f'{name}.bin'))
    meta = {
        'dataset': dataset,
        'source': source,
        'tokenizer': tok.name,
        'tokenizer_file': copy_tokenizer(tok, out_dir),
        'vocab_size': tok.vocab_size,
        'eos_id': tok.eos_id,
        'eos_token': eos_token,
        'dtype': 'uint16',
        'tokens': {name: n for name, (_, n, _) in written.items()},
        'documents': {name: d for name, (_, _, d) in written.items()},
    }
    write_json(meta_path, meta)
    return meta


def main():
    try:
        meta = prepare(dataset, input, tokenizer, out_dir, val_fraction, seed, num_proc, eos_token)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. out_dir not writable, disk full
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        sys.exit(2)
    for name, n in meta['tokens'].items():
        print(f"{name}: {n:,} tokens in {meta['documents'][name]:,} documents")
    print(f"wrote {out_dir or os.path.join('data', dataset)}")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
