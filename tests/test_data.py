"""prepare_data.py, data directories and the tokenizer that travels with a checkpoint, on generated text with tiny
BPE tokenizers trained here (no network): the splits are lossless and a BPE is trained on train only; a checkpoint
samples after its data moved; data of another tokenizer is refused by eval.py and by a resume; prepare_data.py
replaces no prepared data and checks its options up front. Each mistake is one `error:` line with its exit code, and
no file that was there changes.

    python -m pytest tests/test_data.py -q
"""
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanoponder.tokenizer import data_dir_tokenizer, load_tokenizer
from prepare_data import held_out_halves, split_at_line, split_documents
from nanoponder.runtime import TEMP_SUFFIX, UserError
from helpers import ENV, ROOT, assert_one_error, checksums


# -----------------------------------------------------------------------------
# prepare_data.py: the tokenizer, the splits, the files it writes

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
    # the held-out part is then val and test: the first half of its documents and the rest, or one cut at a line
    assert held_out_halves(['1', '2', '3']) == (['1', '2'], ['3'])
    assert held_out_halves(['a\nbb\nccc\ndddd\n']) == (['a\nbb\nccc\n'], ['dddd\n'])
    assert held_out_halves(['one line\n']) == (['one line\n'], [])  # nothing to cut: test.bin is empty


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
    train, val, test = (read_documents(out, split, tok) for split in ('train', 'val', 'test'))
    assert (len(val), len(test)) == (2, 1) and sorted(train + val + test) == sorted(docs)  # lossless, each once
    assert meta == {
        'dataset': 'text', 'source': str(tmp_path / 'corpus'), 'tokenizer': tokenizer_json,
        'tokenizer_file': 'tokenizer.json',
        'tokenizer_sha256': hashlib.sha256(open(tokenizer_json, 'rb').read()).hexdigest(),
        'vocab_size': 300, 'eos_id': 0, 'eos_token': '<|endoftext|>', 'val_fraction': 0.25, 'seed': 1337,
        'dtype': 'uint16',
        'tokens': {s: os.path.getsize(out / f'{s}.bin') // 2 for s in ('train', 'val', 'test')},
        'documents': {'train': 9, 'val': 2, 'test': 1}}
    assert (out / 'tokenizer.json').read_bytes() == open(tokenizer_json, 'rb').read()
    assert_no_temp_files(out)
    # the command that the errors give to prepare it again (read from meta.json) writes the same files
    from nanoponder.data import prepare_command
    command = shlex.split(prepare_command(str(out), meta))
    assert command[:2] == ['python', 'prepare_data.py'] and '--val_fraction=0.25' in command
    before = checksums(out)
    (out / 'test.bin').unlink()
    r = prepare(*command[2:], '--overwrite=True')
    assert r.returncode == 0, r.stderr
    assert checksums(out) == before


def test_single_file_and_glob(tmp_path, tokenizer_json, make_text):
    text = make_text(random.Random(2), WORDS, 200)
    (tmp_path / 'book.txt').write_bytes(text.encode('utf-8'))
    out = tmp_path / 'out'
    r = prepare('--dataset=text', f'--input={tmp_path / "book.txt"}', f'--tokenizer={tokenizer_json}',
                f'--out_dir={out}', '--num_proc=1')
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tokenizer_json)
    [train], [val], [test] = (read_documents(out, split, tok) for split in ('train', 'val', 'test'))
    assert train + val + test == text and train.endswith('\n') and 0.8 < len(train) / len(text) < 0.95
    assert val.endswith('\n') and 0.3 < len(val) / (len(val) + len(test)) < 0.7  # the held-out tail, cut at a line
    assert json.loads((out / 'meta.json').read_text())['documents'] == {'train': 1, 'val': 1, 'test': 1}

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
                '--val_fraction=0.3')  # a single text: val and test are its tail, all of val_text and a bit of train_text
    assert r.returncode == 0, r.stderr
    tok = data_dir_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.eos_id == 0 and tok.name == 'bpe:300'
    [train], [val], [test] = (read_documents(out, split, tok) for split in ('train', 'val', 'test'))
    assert train + val + test == train_text + val_text  # lossless, every split
    assert 'zqx' in val + test and 'zqx' not in train  # the held-out tail only
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


# -----------------------------------------------------------------------------
# the checkpoint's identity: its tokenizer, and data of another one

WORDS_A = ['the', 'king', 'queen', 'of', 'ponder', 'token', 'café', 'line\n']
WORDS_B = ['alpha', 'beta', 'gamma', 'delta', 'x', 'y', '日本語\n']
TRAIN = ['--model=', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--vocab_size=320',
         '--batch_size=2', '--gradient_accumulation_steps=1', '--eval_interval=2', '--eval_iters=1', '--log_interval=1',
         '--warmup_iters=1', '--n_thoughts=0', '--device=cpu', '--dtype=float32', '--compile=False']


def run(script, *args, env=ENV, **kwargs):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180, **kwargs)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_tokenizer, make_text):
    """A 2-iteration run on data prepared with tokenizer A, whose data directory was then moved away; and data of
    tokenizer B. -> {'ckpt', 'data_a' (the moved data), 'data_b', 'corpus'}."""
    from prepare_data import prepare
    root = tmp_path_factory.mktemp('identity')
    corpus = root / 'corpus.txt'
    corpus.write_text(make_text(random.Random(0), WORDS_A, 2000), encoding='utf-8')
    for name, words in (('data_a', WORDS_A), ('data_b', WORDS_B)):
        prepare('text', input=str(corpus), tokenizer=tiny_tokenizer(words), out_dir=str(root / name), num_proc=1)
    r = run('train.py', *TRAIN, '--max_iters=2', f'--data_dir={root / "data_a"}', f'--out_dir={root / "out"}')
    assert r.returncode == 0, r.stderr[-3000:]
    os.rename(root / 'data_a', root / 'moved')
    return {'ckpt': root / 'out' / 'ckpt.pt', 'data_a': root / 'moved', 'data_b': root / 'data_b', 'corpus': corpus}


def variant(trained, path, keep_tokenizer=True, data_dir=None):
    """A copy of the trained checkpoint at path: without its tokenizer (as an older train.py saved them) and/or
    recording another data_dir."""
    raw = torch.load(trained['ckpt'], weights_only=True)
    if not keep_tokenizer:
        del raw['tokenizer']
    if data_dir is not None:
        raw['config']['data_dir'] = str(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, path)
    return path


def test_a_checkpoint_samples_after_its_data_moved(trained):
    """Its own tokenizer copy needs no data directory (older checkpoints, without one, use their data's:
    test_eval.py's checkpoints are such)."""
    r = run('sample.py', f'--init_from={trained["ckpt"]}', '--device=cpu', '--dtype=float32', '--max_new_tokens=8',
            '--num_samples=1', '--start=the king')
    assert r.returncode == 0 and r.stdout.startswith('the king') and 'error' not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize('script', ['sample.py', 'eval.py', 'export_hf.py'])
def test_an_older_checkpoint_without_its_data_names_the_tokenizer_option(script, trained, tmp_path):
    ckpt = variant(trained, tmp_path / 'run' / 'old.pt', keep_tokenizer=False, data_dir=tmp_path / 'gone')
    before = checksums(tmp_path)
    r = run(script, f'--init_from={ckpt}', *([f'--out={tmp_path / "hf"}'] if script == 'export_hf.py' else []))
    assert_one_error(r, 2, 'carries no tokenizer', str(tmp_path / 'gone'), 'is gone', '--tokenizer=PATH')
    assert checksums(tmp_path) == before and not (tmp_path / 'hf').exists()


@pytest.mark.parametrize('case', ['its own data_dir was re-prepared', '--data_dir of another tokenizer'])
def test_eval_refuses_data_of_another_tokenizer(case, trained, tmp_path):
    if case == '--data_dir of another tokenizer':
        ckpt, extra = variant(trained, tmp_path / 'run' / 'ckpt.pt'), [f'--data_dir={trained["data_b"]}']
    else:  # the checkpoint's recorded data_dir now holds tokenizer B's data
        ckpt, extra = variant(trained, tmp_path / 'run' / 'ckpt.pt', data_dir=trained['data_b']), []
    before = checksums(tmp_path, trained['data_b'])
    r = run('eval.py', f'--init_from={ckpt}', '--device=cpu', *extra)
    assert_one_error(r, 2, str(trained['data_b']), 'another tokenizer', 'ids that mean other text', '--data_dir=DIR',
                     '--text=FILE')
    assert checksums(tmp_path, trained['data_b']) == before


def test_token_files_cut_short_are_refused_wherever_they_are_read(trained, tmp_path):
    """A resume onto a copy of its data whose train.bin was cut to 40% trained on, silently, though meta.json still
    counted every token; now the file and meta.json must agree wherever a split is read (batches, eval's text)."""
    from nanoponder.batches import open_blocks
    from nanoponder.data import read_tokens
    cut = tmp_path / 'cut'
    shutil.copytree(trained['data_a'], cut)
    shutil.copy(trained['ckpt'], tmp_path / 'ckpt.pt')
    size = os.path.getsize(cut / 'train.bin')
    os.truncate(cut / 'train.bin', size * 2 // 5 // 2 * 2)
    before = checksums(tmp_path)
    r = run('train.py', *TRAIN, '--max_iters=3', '--init_from=resume', f'--data_dir={cut}', f'--out_dir={tmp_path}')
    assert_one_error(r, 2, str(cut / 'train.bin'), f"meta.json says {size // 2:,}", 'prepare the data again',
                     f"--dataset=text --input={trained['corpus']} --tokenizer=", f'--out_dir={cut} --overwrite=True')
    assert checksums(tmp_path) == before
    for read in (lambda: open_blocks(str(cut), 16, 'cpu'), lambda: read_tokens(str(cut), 'train')):
        with pytest.raises(UserError, match='cut short or replaced'):
            read()
    read_tokens(str(trained['data_a']), 'train')  # its own, whole: read as before


@pytest.mark.parametrize('data, code', [('data_b', 2), ('data_a', 0)])
def test_resume_refuses_data_of_another_tokenizer(data, code, trained, tmp_path):
    """Onto tokenizer B's data: refused before training, the checkpoint unchanged. Onto its own data, moved: fine."""
    shutil.copy(trained['ckpt'], tmp_path / 'ckpt.pt')
    before = checksums(tmp_path)
    r = run('train.py', *TRAIN, '--max_iters=3', '--init_from=resume', f'--data_dir={trained[data]}',
            f'--out_dir={tmp_path}')
    if code:
        assert_one_error(r, code, str(trained['data_b']), 'another tokenizer', 'resuming would train on ids',
                         'start a new run')
        assert checksums(tmp_path) == before
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 3


# -----------------------------------------------------------------------------
# prepare_data.py's mistakes, and the data a run or an evaluation is given

def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))  # the tokenizer.json fits, train.bin does not


@pytest.mark.parametrize('case, args, code, words', [
    ('into prepared data', [], 2, ['already holds prepared data', 'train.bin, val.bin, test.bin, meta.json',
                                   '--overwrite=True']),
    ('num_proc < 1', ['--overwrite=True', '--num_proc=-3'], 2, ['num_proc must be', '>= 1', '-3']),
    ('val_fraction near 1', ['--overwrite=True', '--val_fraction=0.9999'], 2,
     ['val_fraction must be', 'at most 0.5', 'train gets the rest', '0.9999']),
    ('file too large', ['--overwrite=True'], 1, ['could not write', 'train.bin', 'File too large', 'nothing in']),
    ('BPE too large', ['--overwrite=True', '--tokenizer=bpe:5000'], 2, ['only enough distinct pairs']),
])
def test_prepare_data_mistakes_keep_the_data(case, args, code, words, trained, tmp_path):
    """Into a directory holding prepared data: refused, or (--overwrite=True) a bad option or a failed write
    leaves every file as it was, and no temp file here or in TMPDIR (a failed BPE used to leave one there)."""
    data, tmp = tmp_path / 'data', tmp_path / 'tmp'
    shutil.copytree(trained['data_a'], data)
    tmp.mkdir()
    before = checksums(data)
    r = run('prepare_data.py', '--dataset=text', f'--input={trained["corpus"]}', f'--out_dir={data}',
            f'--tokenizer={data / "tokenizer.json"}', *args, env={**ENV, 'TMPDIR': str(tmp)},
            preexec_fn=limit_file_size if case == 'file too large' else None)
    assert_one_error(r, code, *words)
    if case == 'file too large':
        assert f"could not write {data / 'train.bin'}:" in r.stderr
    assert checksums(data) == before and os.listdir(tmp) == []


def test_prepare_data_refuses_an_out_dir_that_is_a_file(trained, tmp_path):
    (tmp_path / 'f').write_text('mine')
    r = run('prepare_data.py', '--dataset=text', f'--input={trained["corpus"]}', f'--out_dir={tmp_path / "f" / "d"}',
            f'--tokenizer={trained["data_a"]}')
    assert_one_error(r, 2, f'{tmp_path / "f"} is a file, not a directory', '--out_dir')
    assert os.listdir(tmp_path) == ['f'] and (tmp_path / 'f').read_text() == 'mine'


def test_token_files_use_the_temp_naming_that_stale_cleanup_knows(trained, tmp_path):
    """write_token_file writes name.tmpPID (runtime.temp_path), and the next prepare_data.py run removes what a
    killed one left; --overwrite=True replaces the data and its meta.json records the new tokenizer."""
    from nanoponder.data import read_meta, write_token_file
    seen = []

    def ids():
        yield [1, 2, 3]
        seen.extend(os.listdir(tmp_path))
    tmp, n_tokens, n_docs = write_token_file(ids(), str(tmp_path / 'train.bin'))
    assert (n_tokens, n_docs) == (3, 1) and seen == [os.path.basename(tmp)]
    assert TEMP_SUFFIX.search(seen[0]).group(1) == str(os.getpid()) and seen[0].startswith('train.bin.tmp')

    data = tmp_path / 'data'
    shutil.copytree(trained['data_a'], data)
    (data / 'train.bin.tmp4194999').write_bytes(b'left by a killed run')  # no such process (above pid_max)
    r = run('prepare_data.py', '--dataset=text', f'--input={trained["corpus"]}', f'--out_dir={data}',
            f'--tokenizer={trained["data_b"]}', '--overwrite=True')
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(data)) == ['meta.json', 'test.bin', 'tokenizer.json', 'train.bin', 'val.bin']
    assert read_meta(str(data))['tokenizer_sha256'] == read_meta(str(trained['data_b']))['tokenizer_sha256']


def test_an_older_meta_json_gets_its_identity_from_its_tokenizer_json(trained, tmp_path):
    """meta.json from before tokenizer_sha256: read_meta computes it, so old data is checked like new data."""
    import json

    from nanoponder.data import read_meta
    shutil.copytree(trained['data_b'], tmp_path / 'old')
    meta = json.loads((tmp_path / 'old' / 'meta.json').read_text())
    del meta['tokenizer_sha256']
    (tmp_path / 'old' / 'meta.json').write_text(json.dumps(meta))
    assert read_meta(str(tmp_path / 'old'))['tokenizer_sha256'] == read_meta(str(trained['data_b']))['tokenizer_sha256']


def test_a_checkpoint_whose_values_have_the_wrong_types_is_refused_in_one_line(tmp_path):
    """A crafted file with every key of a checkpoint but a tokenizer that is no dict: refused on load, not later."""
    import torch
    from nanoponder.checkpoint import Checkpoint
    from nanoponder.runtime import UserError
    raw = {'format': 2, 'model_args': {}, 'model': {}, 'optimizer': {}, 'scaler': {}, 'iter_num': 0,
           'data_state': {}, 'rng': {}, 'best_val_loss': 1.0, 'config': {}, 'tokenizer': 'not a dict'}
    torch.save(raw, tmp_path / 'ckpt.pt')
    with pytest.raises(UserError, match='not a train.py checkpoint .tokenizer not a dict'):
        Checkpoint.load(str(tmp_path / 'ckpt.pt'))


def test_a_failed_prepare_into_a_new_directory_leaves_none(trained, tmp_path):
    data = tmp_path / 'new'
    r = run('prepare_data.py', '--dataset=text', f'--input={trained["corpus"]}', f'--out_dir={data}',
            f'--tokenizer={trained["data_a"] / "tokenizer.json"}', preexec_fn=limit_file_size)
    assert_one_error(r, 1, f"could not write {data / 'train.bin'}", 'File too large')
    assert os.listdir(tmp_path) == []


def test_data_without_its_tokenizer_json_is_said_at_training_and_at_sampling(trained, tmp_path):
    """meta.json names a BPE whose tokenizer.json is gone: training says the checkpoints carry no tokenizer, and
    sampling that checkpoint names --tokenizer=PATH, which then works."""
    data = tmp_path / 'data'
    shutil.copytree(trained['data_a'], data)
    os.remove(data / 'tokenizer.json')
    meta = json.loads((data / 'meta.json').read_text())
    (data / 'meta.json').write_text(json.dumps({**meta, 'tokenizer': 'bpe:300'}))  # as prepare_data names a BPE
    r = run('train.py', *TRAIN, '--max_iters=2', f'--data_dir={data}', f'--out_dir={tmp_path / "out"}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'cannot be loaded' in r.stdout and 'will need --tokenizer=PATH' in r.stdout, r.stdout[-3000:]
    sample = ['sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=3', '--device=cpu', '--dtype=float32']
    assert_one_error(run(*sample), 2, 'carries no tokenizer', 'its data had no tokenizer.json', '--tokenizer=PATH')
    r = run(*sample, f'--tokenizer={trained["data_a"] / "tokenizer.json"}')
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize('script, args, words', [
    ('train.py', ['--data_dir=FILE'], ['is a file, not a data directory']),
    ('train.py', ['--data_dir=DATA', '--out_dir=DATA'], ['out_dir is the data_dir', 'another --out_dir']),
    ('train.py', ['--data_dir=BADEOS'], ['eos_id 99999', '0 <= eos_id < vocab_size']),
    ('eval.py', ['--split=test'], ['has no test split', '--overwrite=True', 'keeps train', '--split=val']),
    ('eval.py', ['--tasks=my_task', '--task_dir=MISSING'], ["task_dir", 'is not a directory']),
])
def test_data_and_task_paths_are_said_truthfully(script, args, words, trained, tmp_path):
    data, bad_eos = tmp_path / 'data', tmp_path / 'bad_eos'
    shutil.copytree(trained['data_a'], data)
    if '--split=test' in args:  # data prepared before there were test splits
        (data / 'test.bin').unlink()
        meta = json.loads((data / 'meta.json').read_text())
        (data / 'meta.json').write_text(json.dumps({**meta, 'tokens': {k: v for k, v in meta['tokens'].items()
                                                                       if k != 'test'}}))
    shutil.copytree(trained['data_a'], bad_eos)
    meta = json.loads((bad_eos / 'meta.json').read_text())
    (bad_eos / 'meta.json').write_text(json.dumps({**meta, 'eos_id': 99999}))
    (tmp_path / 'file').write_text('mine')
    names = {'FILE': tmp_path / 'file', 'DATA': data, 'BADEOS': bad_eos, 'MISSING': tmp_path / 'missing'}
    args = [a.split('=')[0] + '=' + str(names[a.split('=')[1]]) if a.split('=')[1] in names else a for a in args]
    before = checksums(tmp_path)
    common = TRAIN + ['--max_iters=2', f'--out_dir={tmp_path / "out"}'] if script == 'train.py' else \
        [f'--init_from={trained["ckpt"]}', f'--data_dir={data}', '--device=cpu', f'--out={tmp_path / "res"}']
    assert_one_error(run(script, *common, *args), 2, *words)
    assert checksums(tmp_path) == before
