"""sample.py end to end, as a subprocess, on a tiny PonderLM-2 checkpoint and a tiny Hugging Face GPT-NeoX
directory, with a byte-level BPE tokenizer trained here (CPU, no network, no ../shared).

    python -m pytest tests/test_sample.py -q
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import conftest  # noqa: E402
from conftest import train_tiny_tokenizer  # noqa: E402
from prepare_data import load_tokenizer, prepare  # noqa: E402
from sample import TextStream, safe_decode  # noqa: E402

WORDS = ['the', 'king', 'queen', 'of', 'ponder', 'thought', 'token', 'café', 'naïve', '日本語', '🙂', 'line\n']
PROMPT = 'the king of café 🙂 thought'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models: threads only cost, and other jobs may share the CPU
RATE_LINE = re.compile(r'^generated (\d+) tokens in [\d.]+ s: [\d.]+ tokens/s$')


def make_text(rng, n_lines):
    return conftest.make_text(rng, WORDS, n_lines, max_words=10)


@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer with <|endoftext|> = 0 and a vocabulary of 300."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp('tok') / 'tokenizer.json', WORDS, max_words=10)


@pytest.fixture(scope='module')
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def scale_weights(model, std):
    """Random init gives near-uniform logits; larger weights make greedy choices decisive, not float ties."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


@pytest.fixture(scope='module')
def out_dir(tmp_path_factory, tokenizer_json):
    """An out_dir/ckpt.pt that train.py made: a tiny PonderLM-2 model (n_thoughts=1) trained for a few seconds on a
    repeating cycle of words (enough for decisive, varied greedy continuations: a random model repeats one token,
    which would hide a wrong cache), from a data_dir that prepare_data.py wrote (meta.json, tokenizer.json). The
    vocabulary is padded past the tokenizer's 300 ids, as Pythia's is."""
    root = tmp_path_factory.mktemp('run')
    corpus, data_dir, out = root / 'corpus.txt', root / 'data', root / 'out'
    corpus.write_text(' '.join(WORDS * 80), encoding='utf-8')
    prepare('text', input=str(corpus), tokenizer=tokenizer_json, out_dir=str(data_dir), num_proc=1)
    r = subprocess.run(
        [sys.executable, 'train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--model=', '--n_layer=2',
         '--n_head=4', '--n_embd=32', '--vocab_size=320', '--block_size=48', '--batch_size=8',
         '--gradient_accumulation_steps=1', '--max_iters=60', '--eval_interval=60', '--eval_iters=1',
         '--log_interval=60', '--learning_rate=1e-2', '--warmup_iters=2', '--n_thoughts=1', '--n_jacobi=2',
         '--jacobi_train_range=(1,2)', '--device=cpu', '--dtype=float32', '--compile=False'],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(out / 'ckpt.pt') and os.path.isfile(data_dir / 'tokenizer.json')
    return str(out)


def run_samples(*arg_lists):
    """Run sample.py once per argument list, all at the same time (most of each run is importing torch)."""
    procs = [subprocess.Popen([sys.executable, 'sample.py', '--device=cpu', *args], cwd=REPO, env=ENV, text=True,
                              encoding='utf-8', stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in arg_lists]
    return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=120)]]


def ok(*arg_lists):
    """Run sample.py successfully; for each run return (the samples printed on stdout, stderr's lines)."""
    results = []
    for rc, out, err in run_samples(*arg_lists):
        assert rc == 0, err
        lines = err.strip().splitlines()
        assert RATE_LINE.match(lines[-1]), err
        results.append((''.join(line for line in out.splitlines(keepends=True) if not line.startswith('config: ')),
                        lines))
    return results


def fails(*arg_lists):
    """Run sample.py expecting user errors: one `error:` line on stderr, no traceback, non-zero exit; return them."""
    lines = []
    for rc, _, err in run_samples(*arg_lists):
        assert rc in (1, 2), (rc, err)
        assert 'Traceback' not in err
        err_lines = err.strip().splitlines()
        assert len(err_lines) == 1 and err_lines[0].startswith('error: '), err
        lines.append(err_lines[0])
    return lines


# ----------------------------------------------------------------------------- end to end, train.py checkpoint

def test_greedy_same_with_and_without_cache_and_from_a_file(out_dir, tmp_path):
    prompt_file = tmp_path / 'prompt.txt'
    prompt_file.write_text(PROMPT, encoding='utf-8')
    common = ['--temperature=0', '--max_new_tokens=24', '--n_jacobi=64', f'--out_dir={out_dir}']
    (cached, err), (uncached, _), (from_file, _) = ok(
        common + [f'--start={PROMPT}', '--use_cache=True'],
        common + [f'--start={PROMPT}', '--use_cache=False'],
        common + [f'--start=FILE:{prompt_file}'])
    assert cached == uncached == from_file
    continuation = cached[len(PROMPT):]
    assert cached.startswith(PROMPT) and len(set(continuation.split())) >= 4  # varied: a real test of the cache
    assert int(RATE_LINE.match(err[-1]).group(1)) == 24


def test_streamed_samples_match_printed_ones(out_dir):
    """Hot sampling makes multi-byte characters split over tokens (and bytes that never form one) likely: the
    incremental decoding of --stream must still print exactly the text of the whole sample. An empty start begins
    at EOS."""
    common = [f'--out_dir={out_dir}', '--num_samples=2', '--max_new_tokens=40', '--temperature=2.0', '--top_k=0',
              '--start=', '--seed=7']
    (streamed, err), (printed, _) = ok(common + ['--stream=True'], common + ['--stream=False'])
    assert streamed == printed
    samples = printed.split('---------------\n')
    assert len(samples) == 2 and all(s.strip() for s in samples) and samples[0] != samples[1]
    assert int(RATE_LINE.match(err[-1]).group(1)) == 80


def test_truncate_keeps_the_last_tokens(out_dir):
    ckpt = os.path.join(out_dir, 'ckpt.pt')  # init_from may also name the checkpoint file itself
    [(out, err)] = ok([f'--init_from={ckpt}', f'--start={PROMPT * 10}', '--truncate=True', '--max_new_tokens=8',
                       '--temperature=0'])
    assert any(line.startswith('note: prompt truncated') for line in err)
    assert PROMPT[-8:] in out and len(out) < len(PROMPT * 10)


def test_errors_are_one_line(out_dir, tmp_path):
    missing = tmp_path / 'nowhere'
    no_ckpt, too_long, no_file = fails(
        [f'--out_dir={missing}'],
        [f'--out_dir={out_dir}', f'--start={PROMPT * 10}', '--max_new_tokens=8'],
        [f'--out_dir={out_dir}', f'--start=FILE:{tmp_path / "no_prompt.txt"}', '--top_p=0.9'])
    assert os.path.join(str(missing), 'ckpt.pt') in no_ckpt and 'train.py' in no_ckpt
    assert 'context of 48' in too_long and '--truncate=True' in too_long
    assert 'prompt file not found' in no_file and 'no_prompt.txt' in no_file


# ----------------------------------------------------------------------------- a Hugging Face directory

def test_hf_directory_matches_transformers_greedy(tmp_path, tokenizer_json, tok):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.GPTNeoXConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    scale_weights(hf, 0.5)
    hf_dir = tmp_path / 'hf'
    hf.save_pretrained(hf_dir)
    shutil.copyfile(tokenizer_json, hf_dir / 'tokenizer.json')

    ids = torch.tensor([tok.encode(PROMPT)])
    hf.generation_config.eos_token_id = None  # HF would stop at EOS; sample.py does not
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_id)[0].tolist()
    assert len(ref) == ids.size(1) + 16 and len(set(ref[ids.size(1):])) >= 4  # varied, so the match means something
    [(out, _)] = ok([f'--init_from={hf_dir}', f'--start={PROMPT}', '--temperature=0', '--max_new_tokens=16'])
    assert out == tok.decode(ref) + '\n'


# ----------------------------------------------------------------------------- the helpers, in process

def test_text_stream_prints_whole_characters(tok, capsys):
    prompt = tok.encode('the king ')
    # characters unseen in training are split into byte tokens; 305 is a padded-vocabulary id
    ids = prompt + tok.encode('日本語 🎉 naïve € café') + [305, tok.eos_id] + tok.encode('ß🎉')
    decode = lambda x: safe_decode(tok, x)
    stream = TextStream(decode, prompt)
    pieces = []
    for i in ids[len(prompt):]:
        stream.add(i)
        pieces.append(capsys.readouterr().out)
    stream.finish()
    pieces.append(capsys.readouterr().out)
    assert decode(prompt) + ''.join(pieces) == decode(ids) + '\n'
    assert len(ids) - len(prompt) > len([p for p in pieces if p])  # some tokens had to wait for the next
    assert not any('\ufffd' in p for p in pieces)  # a split character is held back, never printed broken
