"""prepare_data.py on generated text with a tiny byte-level BPE tokenizer trained here (no network, no ../shared)."""
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nanoponder.tokenizer import data_dir_tokenizer, load_tokenizer
from prepare_data import split_at_line, split_documents
from nanoponder.runtime import TEMP_SUFFIX, UserError
from helpers import ROOT

WORDS = ['the', 'king', 'queen', 'of', 'ponder', 'token', 'café', 'naïve', '日本語', 'emoji 🙂', 'tab\there',
         'crlf\r\n', 'line\n', '  spaced  ', '<|endoftext', '0123']


@pytest.fixture(scope='session')
def tokenizer_json(tiny_tokenizer):
    """A byte-level BPE tokenizer with <|endoftext|> = 0 and a vocabulary of 300."""
    return tiny_tokenizer(WORDS, max_words=12)


@pytest.fixture(scope='session')
def big_vocab_json(tmp_path_factory):
    """A word-level tokenizer with 65537 ids: one too many for uint16."""
    from tokenizers import Tokenizer, models
    vocab = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, 65536)}}
    path = tmp_path_factory.mktemp('big') / 'tokenizer.json'
    Tokenizer(models.WordLevel(vocab, unk_token='<|endoftext|>')).save(str(path))
    return str(path)


def prepare(*args):
    return subprocess.run([sys.executable, 'prepare_data.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def read_documents(out_dir, split, tok):
    """Decode a split's bin file back into documents: every document ends with EOS."""
    ids = np.fromfile(os.path.join(out_dir, f'{split}.bin'), dtype=np.uint16)
    ends = np.flatnonzero(ids == tok.eos_id)
    assert len(ids) and ends[-1] == len(ids) - 1
    return [tok.decode(doc) for doc in np.split(ids, ends + 1)[:-1] for doc in [doc[:-1].tolist()]]


def assert_no_temp_files(out_dir):
    assert not [f for f in os.listdir(out_dir) if f.startswith('.') or f.endswith('.tmp') or TEMP_SUFFIX.search(f)]


def test_load_tokenizer(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    assert (tok.eos_id, tok.vocab_size, tok.name) == (0, 300, tokenizer_json)
    text = 'café 日本語 🙂\r\n  x'
    assert tok.decode(tok.encode(text)) == text and tok.eos_id not in tok.encode(text)
    assert load_tokenizer(os.path.dirname(tokenizer_json)).path == tokenizer_json  # a directory holding one
    with pytest.raises(UserError, match='unknown tokenizer'):
        load_tokenizer('nonsense')


def test_splits():
    text = 'a\nbb\nccc\ndddd\n'
    train, val = split_at_line(text, 0.3)
    assert train + val == text and train.endswith('\n') and val
    assert split_at_line('one\ntwo', 0.01) == ('one\n', 'two')
    with pytest.raises(UserError):
        split_at_line('no line break\n', 0.1)
    splits = split_documents([str(i) for i in range(10)], 0.25, seed=0)
    assert len(splits['val']) == 2 and sorted(splits['train'] + splits['val'], key=int) == [str(i) for i in range(10)]
    assert len(split_documents(['a', 'b'], 0.01, seed=0)['val']) == 1  # at least one val document


def test_directory_of_documents(tmp_path, tokenizer_json, make_text):
    rng = random.Random(1)
    docs = [make_text(rng, WORDS, rng.randint(1, 30)) for _ in range(12)]
    for i, doc in enumerate(docs):
        path = tmp_path / 'corpus' / f'part{i % 3}' / f'doc{i:02d}.txt'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(doc.encode('utf-8'))  # bytes: keep the \r\n as they are
    (tmp_path / 'corpus' / 'notes.md').write_text('not a .txt file')
    (tmp_path / 'corpus' / 'empty.txt').write_text('')
    out = tmp_path / 'out'
    r = prepare('--dataset=text', f'--input={tmp_path / "corpus"}', f'--tokenizer={tokenizer_json}',
                f'--out_dir={out}', '--val_fraction=0.25', '--num_proc=2')
    assert r.returncode == 0, r.stderr

    meta = json.loads((out / 'meta.json').read_text())
    tok = data_dir_tokenizer(str(out))
    train, val = read_documents(out, 'train', tok), read_documents(out, 'val', tok)
    assert len(val) == 3 and sorted(train + val) == sorted(docs)  # lossless, each document exactly once
    assert meta == {
        'dataset': 'text', 'source': str(tmp_path / 'corpus'), 'tokenizer': tokenizer_json,
        'tokenizer_file': 'tokenizer.json',
        'tokenizer_sha256': hashlib.sha256(open(tokenizer_json, 'rb').read()).hexdigest(),
        'vocab_size': 300, 'eos_id': 0, 'eos_token': '<|endoftext|>',
        'dtype': 'uint16',
        'tokens': {s: os.path.getsize(out / f'{s}.bin') // 2 for s in ('train', 'val')},
        'documents': {'train': 9, 'val': 3}}
    assert (out / 'tokenizer.json').read_bytes() == open(tokenizer_json, 'rb').read()
    assert_no_temp_files(out)


def test_single_file_and_glob(tmp_path, tokenizer_json, make_text):
    text = make_text(random.Random(2), WORDS, 200)
    (tmp_path / 'book.txt').write_bytes(text.encode('utf-8'))
    out = tmp_path / 'out'
    r = prepare('--dataset=text', f'--input={tmp_path / "book.txt"}', f'--tokenizer={tokenizer_json}',
                f'--out_dir={out}', '--num_proc=1')
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tokenizer_json)
    [train], [val] = read_documents(out, 'train', tok), read_documents(out, 'val', tok)
    assert train + val == text and train.endswith('\n') and 0.8 < len(train) / len(text) < 0.95
    assert json.loads((out / 'meta.json').read_text())['documents'] == {'train': 1, 'val': 1}

    r = prepare('--dataset=text', f'--input={tmp_path / "*.txt"}', f'--tokenizer={tokenizer_json}', f'--out_dir={out}',
                '--overwrite=True')  # the same data again, into the same directory
    assert r.returncode == 0, r.stderr
    assert read_documents(out, 'train', tok) == [train]
    assert_no_temp_files(out)


@pytest.fixture
def bad_inputs(tmp_path, tokenizer_json, big_vocab_json):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'blank').mkdir()
    (tmp_path / 'blank' / 'a.txt').write_text('')
    (tmp_path / 'mixed').mkdir()
    (tmp_path / 'mixed' / 'good.txt').write_text('fine text\n')
    (tmp_path / 'mixed' / 'bad.txt').write_bytes(b'caf\xe9 latin-1\n')
    (tmp_path / 'ok.txt').write_text('one line\nanother line\n')
    return {'missing': (['--dataset=text', f'--input={tmp_path / "nope"}'], 'input not found'),
            'empty dir': (['--dataset=text', f'--input={tmp_path / "empty"}'], 'no .txt files'),
            'no text': (['--dataset=text', f'--input={tmp_path / "blank"}'], 'no text'),
            'invalid utf-8': (['--dataset=text', f'--input={tmp_path / "mixed"}'], 'bad.txt is not valid UTF-8'),
            'no input': (['--dataset=text'], 'needs --input'),
            'big vocab': (['--dataset=text', f'--input={tmp_path / "ok.txt"}', f'--tokenizer={big_vocab_json}'],
                          '65536 ids'),
            'unknown dataset': (['--dataset=wikitext'], "unknown dataset 'wikitext'"),
            'unknown tokenizer': (['--dataset=text', f'--input={tmp_path / "ok.txt"}', '--tokenizer=llama'],
                                  "unknown tokenizer 'llama'"),
            'missing tokenizer': (['--dataset=text', f'--input={tmp_path / "ok.txt"}', '--tokenizer=no/tok.json'],
                                  'tokenizer file not found'),
            'bad val_fraction': (['--dataset=text', f'--input={tmp_path / "ok.txt"}', '--val_fraction=1'],
                                 'val_fraction must be'),
            'unknown option': (['--val_fractoin=0.2'], 'did you mean val_fraction')}


@pytest.mark.parametrize('case', ['missing', 'empty dir', 'no text', 'invalid utf-8', 'no input', 'big vocab',
                                  'unknown dataset', 'unknown tokenizer', 'missing tokenizer', 'bad val_fraction',
                                  'unknown option'])
def test_bad_input_is_one_error_line(case, bad_inputs, tmp_path, tokenizer_json):
    args, message = bad_inputs[case]
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train.bin').write_bytes(b'previous')
    if not any(a.startswith('--tokenizer=') for a in args):
        args = args + [f'--tokenizer={tokenizer_json}']
    r = prepare(*args, f'--out_dir={out}', '--overwrite=True')  # even allowed to replace it, a bad input keeps it
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert message in lines[0]
    assert (out / 'train.bin').read_bytes() == b'previous'
    assert sorted(os.listdir(out)) == ['train.bin']


def test_bpe_is_trained_on_train_only_and_travels_with_the_data(tmp_path, make_text):
    rng = random.Random(3)
    train_text = make_text(rng, WORDS, 200)
    val_text = ''.join(make_text(rng, WORDS, 1) + 'zqxzqx ' * 5 + '\n' for _ in range(20))  # pairs only val has
    (tmp_path / 'book.txt').write_bytes((train_text + val_text).encode('utf-8'))
    out = tmp_path / 'out'
    r = prepare('--dataset=text', f'--input={tmp_path / "book.txt"}', '--tokenizer=bpe:300', f'--out_dir={out}',
                '--val_fraction=0.3')  # a single text: val is its tail, all of val_text and a bit of train_text
    assert r.returncode == 0, r.stderr
    tok = data_dir_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.eos_id == 0 and tok.name == 'bpe:300'
    [train], [val] = read_documents(out, 'train', tok), read_documents(out, 'val', tok)
    assert train + val == train_text + val_text and 'zqx' in val and 'zqx' not in train  # lossless, both splits
    from tokenizers import Tokenizer as HFTokenizer
    vocab = HFTokenizer.from_file(str(out / 'tokenizer.json')).get_vocab()
    assert len(vocab) == 300 and not any('zq' in t or 'qx' in t for t in vocab)  # no merge learned from val
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['tokenizer'] == 'bpe:300' and meta['tokenizer_file'] == 'tokenizer.json'
    assert_no_temp_files(out)


@pytest.mark.parametrize('spec, message', [('bpe:100', '257 <= N'), ('bpe:lots', 'whole number'),
                                           ('bpe:5000', 'only enough distinct pairs')])
def test_bad_bpe_sizes_are_one_line(tmp_path, spec, message):
    (tmp_path / 'ok.txt').write_text('a small text\nof two lines\n' * 20)
    r = prepare('--dataset=text', f'--input={tmp_path / "ok.txt"}', f'--tokenizer={spec}', f'--out_dir={tmp_path / "out"}')
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and lines[-1].startswith('error: ') and message in lines[-1], r.stderr
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_a_json_file_that_is_not_a_tokenizer_is_one_clear_line(tmp_path):
    (tmp_path / 'tokenizer.json').write_text('{"vocab": {"a": 0}}')  # valid JSON, not a tokenizer
    (tmp_path / 'ok.txt').write_text('some text\nand more\n' * 10)
    r = prepare('--dataset=text', f'--input={tmp_path / "ok.txt"}', f'--tokenizer={tmp_path / "tokenizer.json"}',
                f'--out_dir={tmp_path / "out"}')
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and lines[-1].startswith('error: ') and 'not a Hugging Face tokenizer.json' in lines[-1]


def test_offline_shakespeare_names_every_local_option_at_once(monkeypatch):
    """Offline, the first error already names --input and, with the Pythia tokenizer not cached, --tokenizer."""
    import urllib.request

    import prepare_data

    def offline(*args, **kwargs):
        raise OSError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    monkeypatch.setattr(prepare_data, 'pythia_tokenizer_cached', lambda: False)
    with pytest.raises(UserError) as e:
        prepare_data.shakespeare_text('', 'pythia')
    assert '--input=' in str(e.value) and '--tokenizer=' in str(e.value) and e.value.exit_code == 1
    with pytest.raises(UserError) as e:  # a tokenizer that needs no download: only --input to name
        prepare_data.shakespeare_text('', 'gpt2')
    assert '--input=' in str(e.value) and '--tokenizer=' not in str(e.value)
