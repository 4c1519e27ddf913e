"""eval.py and the checkpoint interop (model.py: adaptive Jacobi, exact thoughts, the official keys, export), offline
on the CPU: tiny models made or trained here, a byte-level BPE tokenizer trained here, lm-eval tasks written here
as YAML over local JSON files, and lm-eval's own 'hf' model on a tiny random GPT-NeoX as the peer.

    python -m pytest tests/test_eval.py -q
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
from model import GPT, GPTConfig, generate_stream, relative_change, settled
from nanoponder.batches import sliding_windows, utf8_bytes
from nanoponder.hf import config_from_hf, jacobi_train_range_from_hf, load_pretrained, read_config, save_pretrained
from helpers import ENV, ROOT, randomize, tiny, write_checkpoint

WORDS = ['the', 'cat', 'dog', 'sat', 'on', 'a', 'mat', 'ran', 'far', 'red', 'café', 'naïve', '日本語', '🙂']


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    return tiny_tokenizer(WORDS, max_words=10)


# -----------------------------------------------------------------------------
# a tiny PonderLM-2 model trained here on a learnable pattern

PERIOD, SEQ, VOCAB = 4, 16, 16


def periodic_batch(gen, batch):
    """Sequences that repeat a random pattern of PERIOD tokens: (x, y) (B, SEQ), y the next tokens."""
    pattern = torch.randint(1, VOCAB, (batch, PERIOD), generator=gen)
    seq = pattern.repeat(1, SEQ // PERIOD + 1)[:, :SEQ + 1]
    return seq[:, :-1], seq[:, 1:]


@pytest.fixture(scope='module')
def trained():
    """A K=1 model trained for 40 AdamW steps (R drawn from 1..3) until it has learned to copy the pattern: after
    the first period the loss is near 0. Trained, its Jacobi passes contract, as the papers' do."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_thoughts=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for it in range(40):
        x, y = periodic_batch(gen, 16)
        _, loss = model(x, y, n_jacobi=1 + it % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(VOCAB - 1) + 0.5  # only the first period is unpredictable
    return model.eval()


# -----------------------------------------------------------------------------
# adaptive Jacobi and the exact thoughts (model.py)

@pytest.mark.parametrize('K', [1, 2])
def test_adaptive_jacobi_tolerance_zero_is_exact_and_a_huge_one_is_one_pass(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(K))
    bound = K * (idx.size(1) - 1)
    zero, huge = [], []  # the r of every stop call: the last is the number of passes used
    with torch.no_grad():
        exact = model.sequential_logits(idx)
        at_zero = model.embed_out(model.think(idx, bound, stop=recorded(settled(0.0), zero)))
        one = model.embed_out(model.think(idx, bound, stop=recorded(settled(1e30), huge)))
        fixed_one, _ = model(idx, n_jacobi=1)
    used_at_zero, used_huge = zero[-1], huge[-1]
    assert 1 <= used_at_zero <= bound and used_huge == 1
    torch.testing.assert_close(at_zero, exact, atol=1e-5, rtol=1e-5)
    assert torch.equal(one, fixed_one)
    assert (fixed_one - exact).abs().max() > 1e-3  # one pass is not exact: the two checks above can tell


def test_generate_prefill_with_a_jacobi_tolerance():
    model = randomize(tiny(n_thoughts=1), std=0.5)
    prompt = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = model.sequential_logits(prompt)[:, -1]
        one, _ = model(prompt, n_jacobi=1)
    passes = []
    (_, at_zero), = generate_stream(model, prompt, 1, temperature=0, stop=recorded(settled(0.0), passes))
    (_, huge), = generate_stream(model, prompt, 1, temperature=0, stop=settled(1e30))
    torch.testing.assert_close(at_zero, exact, atol=1e-5, rtol=1e-5)
    assert 1 <= passes[-1] <= prompt.size(1) - 1
    torch.testing.assert_close(huge, one[:, -1], atol=1e-5, rtol=1e-5)  # one pass: not exact, as the next line shows
    assert (huge - exact).abs().max() > 1e-3
    assert torch.equal(model.generate(prompt, 6, temperature=0, stop=settled(0.0)),
                       model.generate(prompt, 6, temperature=0, n_jacobi=prompt.size(1) - 1))


def test_sample_py_jacobi_tol_zero_samples_with_exact_prompt_thoughts(tmp_path, tokenizer_json, tok):
    from prepare_data import prepare
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


def recorded(stop, passes):
    """The stop predicate stop, also appending every r it is called with to passes."""
    def record(r, z, h):
        passes.append(r)
        return stop(r, z, h)
    return record


def test_stop_sees_what_each_number_of_fixed_passes_computes():
    model = randomize(tiny(n_thoughts=2), std=0.5)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}
    with torch.no_grad():
        last = model.think(idx, 5, stop=lambda r, z, h: seen.setdefault(r, (z, h)) and False)
        assert sorted(seen) == list(range(6)) and torch.equal(seen[5][1], last)
        for r in range(6):
            assert torch.equal(seen[r][1], model.think(idx, r))
    assert seen[0][0].shape == (2, 7, 2, 32)
    assert relative_change(seen[1][0], seen[0][0]) > 1e-3  # the passes do move the thoughts


@pytest.mark.parametrize('K', [1, 2])
def test_exact_thoughts_are_the_sequential_computation_and_a_jacobi_fixed_point(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(K))
    with torch.no_grad():
        h, z = model.sequential(idx, model.new_caches(2, 8, 'cpu'))  # (B, T, C), (B, T, K, C)
        torch.testing.assert_close(model.embed_out(h), model.sequential_logits(idx), atol=1e-5, rtol=1e-5)
        # one more pass over the exact thoughts gives them back: thought j+1 is the output at slot j
        out = model.run_stages([model.embed(idx)] + list(z.unbind(dim=2)))  # (B, T, K+1, C)
        torch.testing.assert_close(out[:, :, :K], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :, K], h, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# eval.py: windows, bytes, loss

@pytest.mark.parametrize('n,block,stride', [(2, 4, 4), (10, 4, 4), (11, 4, 4), (23, 8, 3), (9, 8, 1), (100, 16, 16)])
def test_sliding_windows_score_every_target_once(n, block, stride):
    windows = sliding_windows(n, block, stride)
    scored = [i for start, end, first in windows for i in range(first, end)]
    assert scored == list(range(1, n))  # each target exactly once, in order
    for k, (start, end, first) in enumerate(windows):
        assert end - start - 1 <= block and start < first <= end
        if k:  # later windows keep at least block - stride tokens of context (where the text has them)
            assert first - start - 1 >= min(block - stride, first - 1)


def test_utf8_bytes_of_documents_and_their_separators(tok):
    docs = ['the café 🙂 sat', 'naïve 日本語 dog\n', 'a']
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    assert utf8_bytes(tok, ids) == sum(len(d.encode('utf-8')) for d in docs) + len(docs)
    assert utf8_bytes(tok, tok.encode(docs[0])) == len(docs[0].encode('utf-8'))


def reference_nats(model, ids, windows):
    """Summed nats, one window at a time with a plain forward (vanilla: no thoughts)."""
    total = 0.0
    for start, end, first in windows:
        x = torch.tensor(ids[start:end - 1])[None]
        logits, _ = model(x)
        targets = torch.tensor(ids[first:end])
        total += F.cross_entropy(logits[0, first - start - 1:], targets, reduction='sum').item()
    return total


@pytest.mark.parametrize('stride', [16, 5])
def test_vanilla_loss_and_bits_per_byte(tok, stride):
    model = randomize(tiny(vocab_size=300), std=0.1)
    text = 'the cat sat on a mat 🙂 and the dog ran far, naïve café ' * 4
    ids = np.array([tok.eos_id] + tok.encode(text))
    windows = sliding_windows(len(ids), 16, stride)
    totals = ev.evaluate_loss(model, ids, windows, torch.no_grad(), 'cpu', 3, 0, (), False)
    (row,) = ev.loss_rows(totals, len(ids) - 1, utf8_bytes(tok, ids[1:]), 0, ())
    want = reference_nats(model, ids, windows)
    assert row['loss'] == pytest.approx(want / (len(ids) - 1), rel=1e-5)
    assert row['bits_per_byte'] == pytest.approx(want / (math.log(2) * len(text.encode('utf-8'))), rel=1e-5)


def thought_rows(model, ids, block, max_r, tols=()):
    windows = sliding_windows(len(ids), block, block)
    totals = ev.evaluate_loss(model, ids, windows, torch.no_grad(), 'cpu', 4, max_r, tols, True)
    return {r['name']: r for r in ev.loss_rows(totals, len(ids) - 1, len(ids), max_r, tols)}


@pytest.mark.parametrize('K', [1, 2])
def test_exact_loss_is_sequential_logits_and_jacobi_reaches_it_at_the_bound(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    block = 6
    ids = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(K)).numpy()
    bound = K * (block - 1)
    rows = thought_rows(model, ids, block, bound, tols=(0.0,))
    want = 0.0
    for start, end, first in sliding_windows(len(ids), block, block):
        logits = model.sequential_logits(torch.tensor(ids[start:end - 1])[None])
        want += F.cross_entropy(logits[0], torch.tensor(ids[start + 1:end]), reduction='sum').item()
    assert rows['exact']['loss'] == pytest.approx(want / (len(ids) - 1), rel=1e-6)
    assert rows[f'R={bound}']['loss'] == pytest.approx(rows['exact']['loss'], rel=1e-6)
    assert rows['tol=0']['loss'] == pytest.approx(rows['exact']['loss'], rel=1e-6)
    assert rows[f'R={bound}']['distance_to_exact'] < 1e-5
    assert rows['R=0']['distance_to_exact'] > 1e-3 and abs(rows['R=0']['loss'] - rows['exact']['loss']) > 1e-4


def test_convergence_is_non_increasing_on_a_trained_model(trained):
    """What is asserted: per pass, the change of the thoughts and their distance to the exact ones never grow
    (beyond 1e-6: float32 round-off, which is the floor the exact and the parallel computations agree to), and
    while above that floor each pass at least halves the change (a contraction, not a mere drift)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.cat(periodic_batch(gen, 1), dim=1)[0] for _ in range(8)]).numpy()
    bound = SEQ - 1
    rows = thought_rows(trained, ids, SEQ, bound, tols=(1e-3,))
    change = [rows[f'R={r}']['change'] for r in range(1, bound + 1)]
    dist = [rows[f'R={r}']['distance_to_exact'] for r in range(bound + 1)]
    floor = 1e-6
    for seq in (change, dist):
        assert all(b <= a + floor for a, b in zip(seq, seq[1:])), seq
    assert all(b <= 0.5 * a for a, b in zip(change, change[1:]) if a > 10 * floor), change
    assert dist[0] > 1e-2 and dist[-1] < floor  # the figures do go somewhere: from far to exact
    assert 1 < rows['tol=0.001']['passes'] < bound  # adaptive stops long before the exactness bound


# -----------------------------------------------------------------------------
# eval.py from the command line

def run_eval(*args):
    return subprocess.run([sys.executable, 'eval.py', *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_cli_loss_of_a_checkpoint_on_its_own_data(tmp_path, tokenizer_json):
    from prepare_data import prepare
    corpus = tmp_path / 'corpus.txt'
    rng = random.Random(0)
    corpus.write_text(''.join(' '.join(rng.choice(WORDS) for _ in range(10)) + '\n' for _ in range(60)),
                      encoding='utf-8')
    prepare('text', input=str(corpus), tokenizer=tokenizer_json, out_dir=str(tmp_path / 'data'), num_proc=1)
    model = randomize(tiny(n_thoughts=1, vocab_size=300, block_size=16), std=0.1)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path / 'data')
    r = run_eval(f'--init_from={tmp_path / "ckpt.pt"}', '--max_windows=5', '--max_jacobi=2', '--jacobi_tols=(0.01,)',
                 '--dtype=float32')
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert (tmp_path / 'eval_jacobi.png').stat().st_size > 1000
    assert [row['name'] for row in report['rows']] == ['R=0', 'R=1', 'R=2', 'tol=0.01', 'exact']
    assert report['tokens'] == 5 * 16 and report['kv_cache_bytes_per_token'] == 2 * 2 * 32 * 4 * 2
    assert '| exact (sequential, KV cache) |' in r.stdout and 'KV cache: 1,024 bytes per token' in r.stdout


def run_main(monkeypatch, **config):
    """eval.main() in this process with config keys set, as --key=value would set them."""
    for key, value in config.items():
        assert hasattr(ev, key), key
        monkeypatch.setattr(ev, key, value)
    return ev.main()


@pytest.mark.parametrize('config,match', [
    (dict(init_from='/no/such/ckpt.pt'), 'no such file or directory: /no/such/ckpt.pt'),
    (dict(init_from='/no/such/dir'), 'no such file or directory: /no/such/dir'),
    (dict(thoughts='magic'), 'thoughts must be'), (dict(jacobi_tols=(-1,)), 'jacobi_tols'),
    (dict(stride=-1), 'stride must be >= 0, got -1')])
def test_mistakes_are_user_errors(monkeypatch, tmp_path, config, match):
    with pytest.raises(ev.UserError, match=match):
        run_main(monkeypatch, out=str(tmp_path / 'x'), **config)


def test_a_mistake_on_the_command_line_is_one_error_line(tmp_path):
    r = run_eval('--init_from=/no/such/ckpt.pt', f'--out={tmp_path}/x')
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert r.returncode == 2 and len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# checkpoint interop: the official keys, v1's adapter, export

OFFICIAL_KEYS = dict(num_latent_thoughts=0, num_jacobi_iterations=3, random_jacobi_iterations=True,
                     interpolation=False, interpolation_use_topk=True, scale_embeds=True, recurrent_model=False,
                     ponderinglm=True, pondering_steps=3, mutiply_pondering_steps=True)


def test_config_reads_every_official_key():
    base = dict(vocab_size=11, num_hidden_layers=1, num_attention_heads=1, hidden_size=8)
    cfg = config_from_hf({**base, **OFFICIAL_KEYS})
    assert (cfg.n_ponder, cfg.ponder_multiply, cfg.scale_embeds, cfg.n_thoughts) == (3, True, True, 0)
    official = {**base, **OFFICIAL_KEYS, 'ponderinglm': False, 'num_latent_thoughts': 2,
                'random_jacobi_iterations': False, 'num_jacobi_iterations': 4}
    thoughts = config_from_hf(official)
    assert (thoughts.n_thoughts, thoughts.n_ponder, jacobi_train_range_from_hf(official)) == (2, 0, (4, 4))
    # recurrent_model is the official loader's "pondering on" switch: it changes nothing; interpolation would
    assert config_from_hf({**base, 'recurrent_model': True, 'num_latent_thoughts': 1}).n_thoughts == 1
    with pytest.raises(ValueError, match='interpolation'):
        config_from_hf({**base, 'interpolation': True})


def test_v1_checkpoint_with_the_official_adapter_loads(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model = randomize(tiny(n_ponder=2, ponder_multiply=True), std=0.1)
    save_pretrained(model, str(tmp_path))
    path = os.path.join(tmp_path, 'model.safetensors')
    sd = load_file(path)
    sd['gpt_neox.adapter.weight'] = torch.zeros(32, 64)  # the official code's unused nn.Linear(2H, H)
    save_file(sd, path, metadata={'format': 'pt'})
    capsys.readouterr()
    loaded = load_pretrained(str(tmp_path)).eval()
    err = capsys.readouterr().err
    assert err.count('adapter.weight') == 1 and err.startswith('note:')
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize('kw', [dict(), dict(n_thoughts=2, n_jacobi=4, jacobi_train_range=(1, 5)),
                                dict(n_ponder=3, ponder_multiply=True), dict(scale_embeds=False),
                                dict(n_pause=2, pause_token_id=299), dict(n_loop=2), dict(n_hidden=2)])
def test_export_round_trips_through_from_pretrained(tmp_path, tokenizer_json, kw):
    train_range = kw.pop('jacobi_train_range', None)  # a setting of the training run, which the export records
    model = randomize(tiny(vocab_size=300, **kw), std=0.1)
    save_pretrained(model, str(tmp_path), tokenizer_json, jacobi_train_range=train_range)
    code = ['model.py', 'modeling_nanoponder.py'] if model.config.method != 'vanilla' else []  # test_share.py
    assert sorted(os.listdir(tmp_path)) == sorted(['config.json', 'model.safetensors', 'tokenizer.json',
                                                   'tokenizer_config.json', *code])
    loaded = load_pretrained(str(tmp_path)).eval()
    for key in ('n_thoughts', 'n_jacobi', 'n_ponder', 'ponder_multiply', 'block_size', 'n_pause', 'pause_token_id',
                'n_loop', 'n_hidden'):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    if train_range:
        assert jacobi_train_range_from_hf(read_config(str(tmp_path))) == train_range
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
    hf = json.loads((tmp_path / 'config.json').read_text())
    assert set(OFFICIAL_KEYS) <= set(hf) and hf['model_type'] == ('nanoponder' if code else 'gpt_neox')


def test_exported_vanilla_model_runs_in_stock_transformers(tmp_path, tokenizer_json, tok):
    transformers = pytest.importorskip('transformers')
    model = randomize(tiny(vocab_size=300), std=0.3)
    assert model.config.scale_embeds  # the scale must be folded into the exported weights
    save_pretrained(model, str(tmp_path), tokenizer_json)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = 'the café 🙂 sat on a naïve mat'
    assert hf_tok(text)['input_ids'] == tok.encode(text) and hf_tok.eos_token_id == tok.eos_id
    idx = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kw, label', [(dict(n_thoughts=1), 'PonderLM-2 K=1'), (dict(n_loop=1), 'Loop K=1')])
def test_export_script(monkeypatch, capsys, tmp_path, tokenizer_json, kw, label):
    from prepare_data import prepare
    (tmp_path / 'corpus.txt').write_text('the cat sat on a mat\n' * 20, encoding='utf-8')
    prepare('text', input=str(tmp_path / 'corpus.txt'), tokenizer=tokenizer_json, out_dir=str(tmp_path / 'data'),
            num_proc=1)
    model = tiny(vocab_size=300, **kw)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path / 'data')
    import export_hf
    monkeypatch.setattr(export_hf, 'init_from', str(tmp_path / 'ckpt.pt'))
    monkeypatch.setattr(export_hf, 'out', str(tmp_path / 'hf'))
    capsys.readouterr()
    export_hf.main()
    assert f"trust_remote_code=True): its code (modeling_nanoponder.py, model.py) runs its {label}" in \
        capsys.readouterr().err
    loaded = load_pretrained(str(tmp_path / 'hf'))
    assert loaded.config.method == model.config.method and torch.equal(loaded.embed_in.weight, model.embed_in.weight)
    assert (tmp_path / 'hf' / 'tokenizer.json').read_bytes() == (tmp_path / 'data' / 'tokenizer.json').read_bytes()
    with pytest.raises(ev.UserError, match='already holds a model'):
        export_hf.main()


# -----------------------------------------------------------------------------
# downstream: lm-eval

def lm_tasks(root, hf_model):
    """Three tasks as lm-eval YAML over local JSON lines: multiple choice, LAMBADA-style loglikelihood (some
    targets made greedy under hf_model, so is_greedy is compared on both values), and rolling perplexity."""
    rng = random.Random(0)

    def line(n):
        return ' '.join(rng.choice(WORDS[:10]) for _ in range(n))

    def write(name, docs, spec):
        with open(root / f'{name}.jsonl', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps(d) + '\n' for d in docs)
        (root / f'{name}.yaml').write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n"
            f"  cache_dir: {root / 'cache'}\ntest_split: test\n{spec}", encoding='utf-8')

    write('tiny_mc', [{'question': line(6), 'choices': [line(2), line(1), line(3)], 'label': i % 3} for i in range(8)],
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
          '  - metric: acc_norm\n')
    docs = [{'context': line(8), 'target': ' cat'} for _ in range(6)] + greedy_docs(hf_model, line, 3)
    write('tiny_lambada', docs,
          'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\nmetric_list:\n'
          '  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n  - metric: acc\n')
    write('tiny_rolling', [{'page': '\n'.join(line(12) for _ in range(8))} for _ in range(3)],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\nmetric_list:\n'
          '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n')
    return ['tiny_mc', 'tiny_lambada', 'tiny_rolling']


def greedy_docs(hf_model, line, n):
    """n documents whose target is the model's greedy next token after the context (and tokenizes as that token
    after it), so that is_greedy is true for them."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(hf_model.name_or_path)
    found = []
    for _ in range(100):
        context = line(6)
        ids = tok(context)['input_ids']
        with torch.no_grad():
            best = hf_model(torch.tensor([ids])).logits[0, -1].argmax().item()
        target = tok.decode([best])
        if target.strip() and tok(context + target)['input_ids'] == ids + [best]:
            found.append({'context': context, 'target': target})
        if len(found) == n:
            return found
    raise AssertionError(f"found only {len(found)} contexts whose greedy token is a clean continuation")


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory, tokenizer_json):
    """A tiny random GPT-NeoX saved by transformers, with our tokenizer.json beside it."""
    transformers = pytest.importorskip('transformers')
    path = tmp_path_factory.mktemp('hf')
    cfg = transformers.GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=48, rotary_pct=0.25,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    shutil.copy(tokenizer_json, path / 'tokenizer.json')
    (path / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
        'unk_token': '<|endoftext|>', 'model_max_length': 48}))
    return path


def test_lm_eval_adapter_matches_lm_evals_own_hf_model(tmp_path, hf_dir):
    """The same model and tokenizer through our adapter and through lm-eval's 'hf' model: equal accuracies, and
    every log-likelihood within 1e-4 (the rolling task's documents span several 48-token windows)."""
    lm_eval = pytest.importorskip('lm_eval')
    pytest.importorskip('accelerate')  # lm-eval's hf model needs it
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval()
    names = lm_tasks(tmp_path, hf_model)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours = ev.lm_eval_adapter().NanoPonderLM(init_from=str(hf_dir), batch_size=3)
    peer = HFLM(pretrained=str(hf_dir), device='cpu', batch_size=3)
    results = [lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                       log_samples=True) for lm in (ours, peer)]
    assert_same_results(*results, names)


def assert_same_results(a, b, names):
    """lm-eval results a (ours) and b (the peer's): equal accuracies, every log-likelihood within 1e-4."""
    for name in names:
        for metric, value in b['results'][name].items():
            if isinstance(value, float):
                assert a['results'][name][metric] == pytest.approx(value, rel=1e-4), (name, metric)
        for mine, theirs in zip(a['samples'][name], b['samples'][name], strict=True):
            for x, y in zip(mine['resps'], theirs['resps'], strict=True):
                if isinstance(y[0], tuple):  # (logprob, is_greedy)
                    assert x[0][0] == pytest.approx(y[0][0], abs=1e-4) and x[0][1] == y[0][1]
                else:
                    assert x[0] == pytest.approx(y[0], abs=1e-4)
    assert 0 < a['results']['tiny_lambada']['acc,none'] < 1  # both greedy and non-greedy targets were compared
    assert 0 < a['results']['tiny_mc']['acc,none'] < 1


def test_lm_evals_own_hf_model_scores_a_ponderlm2_export_as_our_adapter(tmp_path, tokenizer_json):
    """A PonderLM-2 K=1 export through lm-eval's stock 'hf' model (trust_remote_code=True: the directory's own
    code, exact thoughts asked through from_pretrained's thoughts=) and through our adapter: the same scores."""
    lm_eval = pytest.importorskip('lm_eval')
    pytest.importorskip('accelerate')
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model = randomize(tiny(vocab_size=300, block_size=48, n_thoughts=1), std=0.3)
    save_pretrained(model, str(tmp_path / 'hf'), tokenizer_json)
    path = str(tmp_path / 'hf')
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, thoughts='exact')
    names = lm_tasks(tmp_path, hf_model.eval())
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours = ev.lm_eval_adapter().NanoPonderLM(init_from=path, batch_size=3)  # thoughts='exact', its default
    peer = HFLM(pretrained=path, device='cpu', batch_size=3, trust_remote_code=True, thoughts='exact')
    assert type(peer.model).__name__ == 'NanoPonderForCausalLM'
    results = [lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                       log_samples=True) for lm in (ours, peer)]
    assert_same_results(*results, names)


def test_eval_needs_lm_eval_only_for_tasks_and_registers_nanoponder():
    r = subprocess.run([sys.executable, '-c', "import sys, eval; assert 'lm_eval' not in sys.modules"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    registry = pytest.importorskip('lm_eval.api.registry')
    cls = ev.lm_eval_adapter().NanoPonderLM  # defines and registers the class
    assert registry.get_model('nanoponder') is cls


def test_tasks_without_lm_eval_are_one_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lm_eval', None)  # import lm_eval now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, 'nanoponder.lm_eval_adapter', raising=False)
    with pytest.raises(ev.UserError, match=r"downstream tasks need lm-evaluation-harness: pip install 'lm-eval"):
        ev.lm_eval_adapter()


def instance(kind, args):
    from lm_eval.api.instance import Instance
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


PAIRS = [('the cat sat on', ' a mat'), ('naïve café', ' 🙂'), ('', 'the dog')]  # (context, continuation)


def reference_logprob(tok, context, continuation, logits_of):
    """The log-probability of continuation after context: one unpadded sequence through logits_of, (B, T) ids ->
    (B, T, V) logits."""
    ctx = tok.encode(context) if context else [tok.eos_id]
    cont = tok.encode(context + continuation)[len(ctx):] if context else tok.encode(continuation)
    idx = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(logits_of(idx[:, :-1])[0].float(), dim=-1)
    return logprobs[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum().item()


def test_lm_eval_adapter_scores_thought_models_exactly_or_with_jacobi(tok):
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    requests = [instance('loglikelihood', p) for p in PAIRS]
    exact = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(requests)
    jacobi = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, thoughts='jacobi', n_jacobi=0).loglikelihood(requests)
    for (context, continuation), (lp_exact, _), (lp_jacobi, _) in zip(PAIRS, exact, jacobi):
        assert lp_exact == pytest.approx(reference_logprob(tok, context, continuation, model.sequential_logits),
                                         abs=1e-4)
        assert lp_jacobi == pytest.approx(
            reference_logprob(tok, context, continuation, lambda x: model(x, n_jacobi=0)[0]), abs=1e-4)
    assert max(abs(e[0] - j[0]) for e, j in zip(exact, jacobi)) > 1e-3  # the two ways differ: both are checked


@pytest.mark.parametrize('kw', [dict(n_pause=2, pause_token_id=299), dict(n_loop=1), dict(n_hidden=2)])
def test_lm_eval_adapter_scores_a_baseline_in_one_forward_per_batch(tok, kw):
    """No thoughts: the parallel forward is exact, right-padded batches included (Pause's slots after the padding
    come after every slot that is scored)."""
    pytest.importorskip('lm_eval')
    model = randomize(tiny(vocab_size=300, **kw), std=0.3)
    forwards = []
    counted = model.forward
    model.forward = lambda *args, **kwargs: forwards.append(args[0].shape) or counted(*args, **kwargs)
    scores = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(
        [instance('loglikelihood', p) for p in PAIRS])
    assert len(forwards) == 2 and forwards[0][0] == 2  # 3 requests: a batch of 2 and one of 1
    for (context, continuation), (logprob, _) in zip(PAIRS, scores):
        assert logprob == pytest.approx(reference_logprob(tok, context, continuation, lambda x: counted(x)[0]),
                                        abs=1e-4)


def test_lm_eval_generate_until_stops_at_strings_and_max_tokens(tok):
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    lm = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2)
    prompt = 'the cat sat on'
    ids = torch.tensor([tok.encode(prompt)])
    greedy = model.generate(ids, 12, temperature=0, n_jacobi=ids.size(1))[0, ids.size(1):].tolist()  # exact prompt
    full = tok.decode(greedy)
    stop = full[3:6]
    assert stop and full.find(stop) >= 3
    got = lm.generate_until([instance('generate_until', (prompt, {'until': [stop], 'max_gen_toks': 12})),
                             instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 5})),
                             instance('generate_until', ('the dog', {'until': ['never seen'], 'max_gen_toks': 5}))])
    assert got[0] == full[:full.find(stop)]
    assert got[1] == tok.decode(greedy[:5])
    dog = torch.tensor([tok.encode('the dog')])
    assert got[2] == tok.decode(model.generate(dog, 5, temperature=0, n_jacobi=dog.size(1))[0, dog.size(1):].tolist())


def test_lm_eval_generate_until_samples_with_the_tasks_settings(tok):
    """do_sample with top_k=1, or a top_p that keeps only the likeliest token, is greedy at any temperature: the
    task's top_k and top_p reach the model's sampler; without do_sample the temperature is ignored."""
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    lm = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2)
    prompt = 'the cat sat on'
    ids = torch.tensor([tok.encode(prompt)])
    greedy = tok.decode(model.generate(ids, 6, temperature=0, exact=True)[0, ids.size(1):].tolist())
    settings = [{'do_sample': True, 'temperature': 5.0, 'top_k': 1}, {'do_sample': True, 'temperature': 5.0,
                'top_p': 1e-6}, {'do_sample': False, 'temperature': 5.0}]
    got = lm.generate_until([instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 6, **s}))
                             for s in settings])
    assert got == [greedy] * 3
    torch.manual_seed(0)
    sampled = lm.generate_until([instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 6,
                                                                       'do_sample': True, 'temperature': 5.0}))
                                 for _ in range(4)])
    assert any(text != greedy for text in sampled)  # sampling at a high temperature does leave the greedy path


def test_downstream_mode_prints_a_table_and_writes_json(monkeypatch, capsys, tmp_path, hf_dir):
    pytest.importorskip('lm_eval')
    import transformers
    names = lm_tasks(tmp_path, transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval())
    common = dict(init_from=str(hf_dir), task_dir=str(tmp_path), out=str(tmp_path / 'res'), limit=4, device='cpu')
    run_main(monkeypatch, tasks=','.join(names), **common)
    report = json.loads((tmp_path / 'res_tasks.json').read_text())
    assert set(report['results']) == set(names) and report['scoring'] == 'none (no thoughts)'
    assert '|tiny_mc' in capsys.readouterr().out.replace(' ', '')
