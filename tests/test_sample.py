"""sample.py end to end, as a subprocess, on a tiny PonderLM-2 checkpoint and a tiny Hugging Face GPT-NeoX
directory, with a byte-level BPE tokenizer trained here (CPU, no network, no ../shared): its options (a tiny
temperature is greedy, a non-finite temperature or top_p is one `error:` line, --jacobi_tol=0 gives exact prompt
thoughts); and generation past the context (the sliding window of GPT.generate_stream) on tiny random models of every
method.

    python -m pytest tests/test_sample.py -q
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import generate_stream, sample
from prepare_data import prepare
from nanoponder.checkpoint import Checkpoint
from nanoponder.methods import method_fields
from nanoponder.tokenizer import TextStream, load_tokenizer, safe_decode
from helpers import ENV, ROOT, assert_one_error, checksums, randomize, tiny, write_checkpoint

WORDS = ['the', 'king', 'queen', 'of', 'ponder', 'thought', 'token', 'café', 'naïve', '日本語', '🙂', 'line\n']
PROMPT = 'the king of café 🙂 thought'
RATE_LINE = re.compile(r'^generated (\d+) tokens in [\d.]+ s: [\d.]+ tokens/s$')


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    """A byte-level BPE tokenizer with <|endoftext|> = 0 and a vocabulary of 300."""
    return tiny_tokenizer(WORDS, max_words=10)


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
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(out / 'ckpt.pt') and os.path.isfile(data_dir / 'tokenizer.json')
    return str(out)


def run_samples(*arg_lists):
    """Run sample.py once per argument list, all at the same time (most of each run is importing torch)."""
    # fp32: the samples are compared with fp32 references (dtype='auto' is bf16 on CPUs with native bf16 matmul)
    procs = [subprocess.Popen([sys.executable, 'sample.py', '--device=cpu', '--dtype=float32', *args], cwd=ROOT,
                              env=ENV, text=True, encoding='utf-8', stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in arg_lists]
    return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=120)]]


def ok(*arg_lists):
    """Run sample.py successfully; for each run return (stdout, which holds the samples only, stderr's lines)."""
    results = []
    for rc, out, err in run_samples(*arg_lists):
        assert rc == 0, err
        lines = err.strip().splitlines()
        assert RATE_LINE.match(lines[-1]), err
        results.append((out, lines))  # stdout is the samples only: the config echo goes to stderr
    return results


def fails(*arg_lists):
    """Run sample.py expecting user errors: one `error:` line on stderr, no traceback, non-zero exit; return them."""
    lines = []
    for rc, _, err in run_samples(*arg_lists):
        assert rc in (1, 2), (rc, err)
        assert 'Traceback' not in err
        err_lines = [line for line in err.strip().splitlines() if not line.startswith('config: ')]  # the echo
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
    no_ckpt, too_long, no_file, seed = fails(
        [f'--out_dir={missing}'],
        [f'--out_dir={out_dir}', f'--start={PROMPT * 10}', '--max_new_tokens=8'],
        [f'--out_dir={out_dir}', f'--start=FILE:{tmp_path / "no_prompt.txt"}', '--top_p=0.9'],
        [f'--out_dir={out_dir}', '--seed=18446744073709551616'])  # was torch's "Overflow when unpacking long long"
    assert 'seed must be a whole number in' in seed and '18446744073709551616' in seed
    assert os.path.join(str(missing), 'ckpt.pt') in no_ckpt and 'train.py' in no_ckpt
    assert 'context of 48' in too_long and '--truncate=True' in too_long
    assert 'prompt file not found' in no_file and 'no_prompt.txt' in no_file


def test_stdout_holds_the_samples_only(out_dir, tmp_path, tok, make_text):
    """`sample.py ... > out` writes exactly the sample (prompt and continuation, computed here in process) and
    nothing else: the config echo, notes and throughput go to stderr. The prompt is multi-line text from a file,
    and the default max_new_tokens (200) runs far past the model's context of 48 tokens."""
    prompt = make_text(random.Random(3), WORDS, 3, max_words=4)
    prompt_file, out_file = tmp_path / 'prompt.txt', tmp_path / 'out.txt'
    prompt_file.write_text(prompt, encoding='utf-8')
    with open(out_file, 'w', encoding='utf-8') as f:
        r = subprocess.run([sys.executable, 'sample.py', '--device=cpu', '--dtype=float32',
                            f'--out_dir={out_dir}', f'--start=FILE:{prompt_file}', '--temperature=0'],
                           cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    err = r.stderr.strip().splitlines()
    assert 'config: temperature = 0.0' in err and int(RATE_LINE.match(err[-1]).group(1)) == 200
    model = Checkpoint.load(os.path.join(out_dir, 'ckpt.pt')).build_model().eval()
    ids = model.generate(torch.tensor([tok.encode(prompt)]), 200, temperature=0)[0].tolist()
    assert out_file.read_text(encoding='utf-8') == safe_decode(tok, ids) + '\n'


def test_default_length_runs_past_the_context_with_and_without_cache(out_dir):
    """200 new tokens on a model with a context of 48: both paths slide through the same windows, with exact
    thoughts, so greedy sampling gives the same text."""
    common = [f'--out_dir={out_dir}', f'--start={PROMPT}', '--temperature=0', '--n_jacobi=64']
    (cached, err), (uncached, _) = ok(common + ['--use_cache=True'], common + ['--use_cache=False'])
    assert cached == uncached and cached.startswith(PROMPT)
    assert int(RATE_LINE.match(err[-1]).group(1)) == 200


@pytest.mark.parametrize('method, label, cache_slots', [('pause-k2', 'Pause K=2', 3), ('loop-k1', 'Loop K=1', 2),
                                                        ('hidden-n2', 'Hidden N=2', 3)])
def test_the_baselines_sample_and_evaluate(out_dir, tmp_path, tok, method, label, cache_slots):
    """A checkpoint of each baseline on the module run's data (its tokenizer, padded vocabulary 320): sample.py's
    cached greedy sample is the uncached one (computed here), and eval.py's loss mode scores it in one row, no
    Jacobi rows, with its KV cache per token. Untrained (random weights, near-uniform logits), so the greedy tokens
    vary; Pause's pause row is zeroed, else its one pause vector would dominate every prediction."""
    data_dir = os.path.join(os.path.dirname(out_dir), 'data')
    model = tiny(vocab_size=320, block_size=48, pause_token_id=319, **method_fields(method))
    with torch.no_grad():
        model.embed_in.weight[319] = 0
    write_checkpoint(tmp_path / 'ckpt.pt', model, data_dir)
    ckpt = f'--init_from={tmp_path / "ckpt.pt"}'
    evaluation = subprocess.Popen([sys.executable, 'eval.py', ckpt, '--max_windows=2', '--device=cpu',
                                   '--dtype=float32'], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)  # at the same time as sample.py: most of each is imports
    [(sampled, _)] = ok([ckpt, f'--start={PROMPT}', '--temperature=0', '--max_new_tokens=16'])
    ids = model.generate(torch.tensor([tok.encode(PROMPT)]), 16, temperature=0, use_cache=False)[0].tolist()
    assert sampled == safe_decode(tok, ids) + '\n' and len(set(ids[-16:])) >= 3, (method, ids[-16:])
    table, err = evaluation.communicate(timeout=120)
    assert evaluation.returncode == 0, err
    lines = table.splitlines()
    assert lines[0].startswith(f'{tmp_path / "ckpt.pt"}: {label};')
    # 2 layers x 32 wide, keys and values in fp32, per cache slot
    assert lines[1] == f'KV cache: {2 * 2 * 32 * 4 * cache_slots:,} bytes per token in float32 ({cache_slots}x vanilla)'
    rows = [line for line in lines if line.startswith('|')][2:]  # after the header and its rule
    assert len(rows) == 1 and rows[0].startswith('| none | - |'), table
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert report['method'] == method and [row['name'] for row in report['rows']] == [label]


# ----------------------------------------------------------------------------- temperature, top_p, jacobi_tol

def run_sample(*args):
    """python sample.py args... in the repository, run to its end -> the CompletedProcess."""
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope='module')
def run_dir(out_dir):
    """The module run's directory: out/ckpt.pt, which train.py made, beside data/ (prepare_data.py's, with its
    tokenizer.json)."""
    return Path(out_dir).parent


@pytest.mark.parametrize('temperature', [1e-40, 1e-320])  # 1e-320 is below float32's range: 0 there
def test_the_sampler_at_a_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [2.0, -1.0, 2.0, 1.0]])
    torch.manual_seed(0)
    drawn = [sample(logits, temperature).flatten().tolist() for _ in range(50)]
    assert {d[0] for d in drawn} == {1} and {d[1] for d in drawn} == {0, 2}  # T -> 0: the maxima, ties shared
    assert sample(logits, temperature, top_k=2, top_p=0.5)[0].item() == 1


def test_sample_py_at_a_tiny_temperature_samples_greedily(run_dir):
    """--temperature=1e-40 overflowed to inf/nan in the sampler (a traceback); T -> 0 is greedy."""
    r = run_sample(f'--init_from={run_dir / "out" / "ckpt.pt"}', '--start=the cat', '--max_new_tokens=12',
                   '--device=cpu', '--dtype=float32', '--temperature=1e-40')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    model = Checkpoint.load(str(run_dir / 'out' / 'ckpt.pt')).build_model().eval()
    tok = load_tokenizer(str(run_dir / 'data' / 'tokenizer.json'))
    with torch.no_grad():
        greedy = model.generate(torch.tensor([tok.encode('the cat')]), 12, temperature=0)[0].tolist()
    assert r.stdout == tok.decode(greedy) + '\n'


@pytest.mark.parametrize('setting, needles', [
    ('--temperature=1e999', ['temperature=inf', 'finite']),
    ("top_p = float('nan')", ['top_p=nan', '(0, 1]']),
])
def test_a_non_finite_temperature_or_top_p_is_one_line(run_dir, tmp_path, setting, needles):
    if not setting.startswith('--'):  # nan has no literal: a config file sets it
        (tmp_path / 'cfg.py').write_text(setting + '\n')
        setting = str(tmp_path / 'cfg.py')
    before = checksums(run_dir)
    r = run_sample(setting, f'--init_from={run_dir / "out" / "ckpt.pt"}', '--device=cpu')
    assert_one_error(r, 2, *needles)
    assert r.stdout == '' and checksums(run_dir) == before


def test_sample_py_jacobi_tol_zero_samples_with_exact_prompt_thoughts(tmp_path, tokenizer_json, tok):
    (tmp_path / 'corpus.txt').write_text('the cat sat on a mat\n' * 20, encoding='utf-8')
    prepare('text', input=str(tmp_path / 'corpus.txt'), tokenizer=tokenizer_json, out_dir=str(tmp_path / 'data'),
            num_proc=1)
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path / 'data')
    prompt = 'the cat sat on a naïve mat'
    r = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path / "ckpt.pt"}', f'--start={prompt}',
                        '--temperature=0', '--max_new_tokens=8', '--jacobi_tol=0', '--dtype=float32'],  # fp32 reference
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([tok.encode(prompt)])
    exact = model.generate(ids, 8, temperature=0, n_jacobi=ids.size(1) - 1)[0].tolist()
    assert r.stdout == tok.decode(exact) + '\n'
    assert 'Jacobi passes to settle to jacobi_tol=0' in r.stderr


# ----------------------------------------------------------------------------- a Hugging Face directory

def test_hf_directory_matches_transformers_greedy(tmp_path, tokenizer_json, tok):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.GPTNeoXConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    randomize(hf, 0.5)
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


# ----------------------------------------------------------------------------- generating past the context

# tiny random models, tiny(method, block_size=BLOCK): their logits are near uniform, so the tokens they pick vary,
# as a test of the window needs (a model repeating one token would look the same through any window)
METHODS = ['vanilla', 'ponderlm2-k1', 'ponderlm1-n2']
BLOCK = 16


def random_prompt(T, seed=1):
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def recomputed_logits(model, idx):
    """Next-token logits (B, V) of idx from scratch, with the Jacobi passes that make every thought exact."""
    return model(idx, n_jacobi=model.exact_passes(idx.size(1)))[0][:, -1]


def windows(n_prompt, n_new, block_size):
    """(start, end) of the tokens each new token is predicted from, by generate_stream's rule written out:
    all of them while they fit, and whenever one more would not, the last block_size // 2."""
    start, out = 0, []
    for end in range(n_prompt, n_prompt + n_new):
        if end - start > block_size:
            start = end - block_size // 2
        out.append((start, end))
    return out


@pytest.mark.parametrize('method', METHODS)
def test_greedy_generation_continues_past_the_context(method):
    """The tokens generated while prompt + new tokens fit are those of a run that never slides; generation goes
    on past block_size; and the cached path equals the uncached one past the slides (the same windows)."""
    model = tiny(method, block_size=BLOCK)
    prompt = random_prompt(5)
    exact = model.config.n_thoughts * prompt.size(1)  # Jacobi passes for exact prompt thoughts, as uncached has
    long = model.generate(prompt, 3 * BLOCK, temperature=0, n_jacobi=exact)
    fits = model.generate(prompt, BLOCK - prompt.size(1), temperature=0, n_jacobi=exact)
    assert long.shape == (2, prompt.size(1) + 3 * BLOCK)
    assert torch.equal(long[:, :BLOCK], fits)
    assert torch.equal(long, model.generate(prompt, 3 * BLOCK, temperature=0, use_cache=False))


@pytest.mark.parametrize('method', METHODS)
def test_each_token_is_predicted_from_its_window(method):
    """Sampled tokens (varied ones); each step's logits equal a from-scratch forward with exact thoughts over the
    window the rule names: the slides come where they should, and the refilled caches are right."""
    model = tiny(method, block_size=BLOCK)
    prompt = random_prompt(5, seed=2)
    torch.manual_seed(1)
    steps = list(generate_stream(model, prompt, 3 * BLOCK, temperature=1.0,
                                       n_jacobi=model.config.n_thoughts * prompt.size(1)))
    tokens = torch.cat([prompt] + [t for t, _ in steps], dim=1)  # (B, T + 3 * BLOCK)
    assert len(set(tokens[0, BLOCK:].tolist())) > BLOCK
    spans = windows(prompt.size(1), len(steps), BLOCK)
    assert len({start for start, _ in spans}) == 5  # the window slid 4 times
    with torch.no_grad():
        for (start, end), (_, logits) in zip(spans, steps):
            torch.testing.assert_close(logits, recomputed_logits(model, tokens[:, start:end]), atol=1e-5, rtol=1e-5)


def test_a_prompt_must_fit_in_the_context():
    """A prompt that fills the context slides at the first token it feeds; a longer one is an error (sample.py
    cuts it with --truncate=True)."""
    model = tiny('vanilla', block_size=BLOCK)
    full = random_prompt(BLOCK)
    assert torch.equal(model.generate(full, 5, temperature=0), model.generate(full, 5, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match='block_size'):
        model.generate(random_prompt(BLOCK + 1), 1)
