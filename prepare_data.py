"""
Tokenize a corpus into flat uint16 token files for training (each document's ids, then the EOS id).

    python prepare_data.py                                  # MiniPile (Hugging Face datasets) -> data/minipile
    python prepare_data.py --dataset=shakespeare            # downloads Tiny Shakespeare -> data/shakespeare
    python prepare_data.py --dataset=shakespeare --input=../shared/data/tinyshakespeare.txt \\
        --tokenizer=../shared/data/pythia_tokenizer.json    # offline
    python prepare_data.py --dataset=text --input=my_corpus/ --out_dir=data/mine --val_fraction=0.05
    python prepare_data.py --dataset=text --input='books/**/*.txt' --tokenizer=gpt2 --num_proc=4
    python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512   # 512-id BPE of the train split -> data/shakespeare-bpe512

Writes out_dir/{train,val,test}.bin, tokenizer.json and meta.json, the data directory that
data.py describes and reads (data.data_dir_tokenizer(out_dir) gives back the tokenizer). An out_dir that already
holds prepared data is refused unless --overwrite=True; every file is written to a temp file first and none is
replaced until all are complete, so a failed run (a bad input, a full disk, Ctrl-C) leaves the old data as it was.

--dataset=text: --input is a .txt file, a directory (all *.txt below it) or a glob; each file is one
document and a val_fraction of the documents is held out (of a single file: its tail, cut at a line), its first
half for val and the rest for test (one held-out document is cut at a line); Tiny Shakespeare likewise.
"""
import glob
import json
import os
import random
import urllib.request

import numpy as np
from tqdm import tqdm

from nanoponder.data import default_data_dir, write_token_file
from nanoponder.runtime import (UserError, check_output_dir, failure, move_into_place, one_line, remove_stale_temp_files,
                                run_cli, temp_file, temp_path)
from nanoponder.tokenizer import bpe_size, load_tokenizer, pythia_tokenizer_cached, train_bpe

# -----------------------------------------------------------------------------
dataset = 'minipile'    # minipile | shakespeare | text
input = ''              # text: file, directory or glob of .txt files; shakespeare: a local copy (no download)
tokenizer = 'pythia'    # pythia | gpt2 | path/to/tokenizer.json | bpe:N (train a byte-level BPE of N ids on train)
out_dir = ''            # default: data/<dataset> (data/<dataset>-bpe<N> with --tokenizer=bpe:N)
val_fraction = 0.1      # text/shakespeare: share (0 < f <= 0.5) of the documents (or text) held out: val, then test
seed = 1337             # which documents go to val
num_proc = min(8, os.cpu_count() or 1)  # processes that tokenize (>= 1)
eos_token = '<|endoftext|>'  # tokenizer.json tokenizers: the token that ends every document
overwrite = False       # replace the prepared data already in out_dir
# -----------------------------------------------------------------------------

MINIPILE = 'JeanKaddour/minipile'
DATA_FILES = ('train.bin', 'val.bin', 'test.bin', 'meta.json')  # what makes a directory hold prepared data
WRITTEN = DATA_FILES + ('tokenizer.json',)  # every file a preparation writes (and replaces)
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


# ----------------------------------------------------------------------------- reading documents

def find_text_files(path):
    """A .txt file, every *.txt below a directory, or the files a glob matches; sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, '**', '*.txt'), recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"no .txt files in directory {path}")
        return files
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"no files match {path}")
        return files
    raise UserError(f"input not found: {path}")


def read_text(path):
    # newline='' keeps \r\n as it is, so the token files decode back to the exact bytes
    try:
        with open(path, encoding='utf-8', newline='') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def split_at_line(text, val_fraction):
    """(train, val) with train + val == text, cut at the line break nearest after (1 - val_fraction)."""
    cut = int(len(text) * (1 - val_fraction))
    i = text.find('\n', cut)
    if i == -1 or i + 1 >= len(text):
        i = text.rfind('\n', 0, cut)  # the only break after the cut ends the text: cut earlier
    if i == -1:
        raise UserError("cannot split a single document into train and val: it has no line break before its "
                        "last line; give several files or more text")
    return text[:i + 1], text[i + 1:]


def split_documents(docs, val_fraction, seed):
    """Hold out a random val_fraction of the documents (at least one); both keep the original order."""
    if len(docs) == 1:
        train, val = split_at_line(docs[0], val_fraction)
        return {'train': [train], 'val': [val]}
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise UserError(f"val_fraction={val_fraction} leaves no training documents out of {len(docs)}")
    val_idx = set(random.Random(seed).sample(range(len(docs)), n_val))
    return {'train': [d for i, d in enumerate(docs) if i not in val_idx],
            'val': [d for i, d in enumerate(docs) if i in val_idx]}


def held_out_halves(held):
    """The held-out texts -> (val, test): the first half of the documents and the rest, or a single document cut at
    the line break nearest after its middle (a single line: all for val, none for test)."""
    if len(held) > 1:
        half = (len(held) + 1) // 2
        return held[:half], held[half:]
    try:
        val, test = split_at_line(held[0], 0.5)
    except UserError:  # one line: all of it for val, and an empty test split
        print("note: the held-out text is a single line, so it all goes to val and test.bin is empty: give more text, "
              "or a larger --val_fraction, for a test split")
        return held, []
    return [val], [test]


def text_documents(path):
    docs = [read_text(f) for f in find_text_files(path)]  # no progress bar: errors must stay one stderr line
    docs = [d for d in docs if d]  # an empty file is not a document
    if not docs:
        raise UserError(f"no text in {path}")
    return docs


def shakespeare_text(path, tokenizer):
    if path:  # a local copy
        if not os.path.isfile(path):
            raise UserError(f"input not found: {path}")
        return read_text(path)
    print(f"downloading {SHAKESPEARE_URL}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as r:
            return r.read().decode('utf-8')
    except Exception as e:
        also = '' if tokenizer != 'pythia' or pythia_tokenizer_cached() else ' and --tokenizer=PATH/to/tokenizer.json'
        raise failure(f"could not download Tiny Shakespeare: {one_line(e, 120)}; offline? pass "
                      f"--input=PATH/to/input.txt{also}") from None


def minipile_splits():
    """{'train', 'val', 'test'} -> Hugging Face datasets with a 'text' column."""
    try:
        from datasets import load_dataset
        ds = load_dataset(MINIPILE)
    except Exception as e:
        raise failure(f"could not load {MINIPILE}: {one_line(e)}") from None
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


def read_splits(dataset, input, tokenizer, val_fraction, seed):
    """-> (source, {split: list of texts, or a Hugging Face dataset}). Local input is read whole here, so that
    bad input fails before anything in out_dir is touched; MiniPile is loaded by the caller, after the
    tokenizer, so that the quick checks come before the big download."""
    if dataset == 'shakespeare':
        train, held = split_at_line(shakespeare_text(input, tokenizer), val_fraction)
        val, test = held_out_halves([held])
        return (os.path.abspath(input) if input else SHAKESPEARE_URL), {'train': [train], 'val': val, 'test': test}
    if dataset == 'text':
        if not input:
            raise UserError("--dataset=text needs --input=PATH (a .txt file, a directory or a glob)")
        splits = split_documents(text_documents(input), val_fraction, seed)
        splits['val'], splits['test'] = held_out_halves(splits['val'])
        return os.path.abspath(input), splits
    return MINIPILE, None


def train_texts(splits):
    """The texts of the train split only (a BPE learns from train, never from val or test)."""
    train = splits['train']
    if isinstance(train, list):
        return train
    return (text for batch in train.iter(batch_size=1024) for text in batch['text'])  # a Hugging Face dataset


def write_splits(splits, tok, out_dir, num_proc, eos_token, temps):
    """Tokenize every split into the temp file of out_dir/{split}.bin, added to temps (final path -> temp file);
    -> {split: (tokens, documents)}."""
    encoder = DocumentEncoder(tok, eos_token)
    counts = {}
    for name, docs in splits.items():
        ids = (encode_texts(docs, encoder, num_proc, name) if isinstance(docs, list)
               else encode_hf_dataset(docs, encoder, num_proc, name))
        path = os.path.join(out_dir, f'{name}.bin')
        try:
            temps[path], n_tokens, n_docs = write_token_file(ids, path)
        finally:
            ids.close()  # its progress bar (and process pool) end now: before an error line, not after it
        counts[name] = (n_tokens, n_docs)
    return counts


def replace_data(out_dir, temps):
    """Rename the complete temp files into place, meta.json last; the files of an earlier preparation that this one
    does not write (a test.bin, a tokenizer.json) go, so that nothing of the old data is read as the new's."""
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new meta.json lands, the old one must not vouch for new files
    for name in WRITTEN:
        path = os.path.join(out_dir, name)
        if path not in temps and os.path.exists(path):
            os.remove(path)
    for path in temps:  # in the order written: meta.json is the last
        move_into_place(path)


def check_out_dir(out_dir, overwrite):
    """Before any work: out_dir is (or can be made) a directory to write in, holding no prepared data unless
    overwrite."""
    check_output_dir(out_dir, '--out_dir')
    held = [name for name in WRITTEN if os.path.exists(os.path.join(out_dir, name))]
    if held and not overwrite:
        what = 'prepared data' if held != ['tokenizer.json'] else 'a tokenizer.json, which the preparation writes'
        raise UserError(f"{out_dir} already holds {what} ({', '.join(held)}): choose another --out_dir, or "
                        f"pass --overwrite=True to replace it")


def prepare(dataset, input='', tokenizer='pythia', out_dir='', val_fraction=0.1, seed=1337, num_proc=1,
            eos_token='<|endoftext|>', overwrite=False, note=''):
    """Read, tokenize and write one dataset (arguments as the config globals above; note: printed once the quick
    checks pass); return the meta dict also written to out_dir/meta.json."""
    if dataset not in ('minipile', 'shakespeare', 'text'):
        raise UserError(f"unknown dataset '{dataset}' (expected minipile, shakespeare or text)")
    if not 0 < val_fraction <= 0.5:  # beyond half, train would be the smaller split (and a BPE learns from it)
        raise UserError(f"val_fraction must be above 0 and at most 0.5 (the share held out for val; train gets the "
                        f"rest), got {val_fraction}")
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise UserError(f"num_proc must be a whole number >= 1 (the processes that tokenize), got {num_proc!r}")
    n_bpe = bpe_size(tokenizer)
    out_dir = out_dir or default_data_dir(dataset, tokenizer)
    check_out_dir(out_dir, overwrite)
    source, splits = read_splits(dataset, input, tokenizer, val_fraction, seed)
    tok = None if n_bpe else load_tokenizer(tokenizer, eos_token)  # before MiniPile's download: quick checks first
    if note:
        print(note)
    if splits is None:
        splits = minipile_splits()
    made = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp_files(out_dir, WRITTEN)  # what a killed preparation left
    tok_path, meta_path = os.path.join(out_dir, 'tokenizer.json'), os.path.join(out_dir, 'meta.json')
    temps = {}  # final path -> its complete temp file (runtime.temp_path naming)
    try:
        if n_bpe:  # trained on the train split only, saved straight to its temp file
            temps[tok_path] = temp_path(tok_path)
            tok = train_bpe(train_texts(splits), n_bpe, temps[tok_path], eos_token)
        elif tok.json_text is not None:  # a copy, so that the data directory is self-contained
            with temp_file(tok_path) as f:
                f.write(tok.json_text.encode('utf-8'))
            temps[tok_path] = temp_path(tok_path)
        print(f"tokenizer: {tok.name} (vocab_size {tok.vocab_size}, eos_id {tok.eos_id})")
        counts = write_splits(splits, tok, out_dir, num_proc, eos_token, temps)
        meta = {
            'dataset': dataset,
            'source': source,
            'tokenizer': tok.name,
            'tokenizer_file': 'tokenizer.json' if tok.json_text is not None else None,
            'tokenizer_sha256': tok.sha256,
            'vocab_size': tok.vocab_size,
            'eos_id': tok.eos_id,
            'eos_token': eos_token,
            'val_fraction': None if dataset == 'minipile' else val_fraction,  # MiniPile comes split
            'seed': None if dataset == 'minipile' else seed,
            'dtype': 'uint16',
            'tokens': {name: n for name, (n, _) in counts.items()},
            'documents': {name: d for name, (_, d) in counts.items()},
        }
        with temp_file(meta_path, 'w') as f:
            f.write(json.dumps(meta, indent=2) + '\n')
        temps[meta_path] = temp_path(meta_path)
    except BaseException as e:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if made and not os.listdir(out_dir):  # a new directory that would stay empty
            os.rmdir(out_dir)
        if isinstance(e, OSError):  # a failed write (disk full, file too large): temp_file named the file
            raise failure(f"could not write {e.filename}: {e.strerror or one_line(e)}; nothing in {out_dir} was "
                          f"replaced") from None
        raise
    replace_data(out_dir, temps)
    return meta


def main():
    try:
        meta = prepare(dataset, input, tokenizer, out_dir, val_fraction, seed, num_proc, eos_token, overwrite)
    except OSError as e:  # making out_dir or renaming into it failed (check_out_dir found it usable)
        raise failure(f"could not write {e.filename or out_dir}: {e.strerror or one_line(e)}") from None
    for name, n in meta['tokens'].items():
        print(f"{name}: {n:,} tokens in {meta['documents'][name]:,} documents")
    print(f"wrote {out_dir or default_data_dir(dataset, tokenizer)}")


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
