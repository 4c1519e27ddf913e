"""Exporting (export_hf.py, nanoponder.hf.save_pretrained) and the export running in transformers as itself: every
setting of every method round-trips through load_pretrained, a vanilla export is stock GPT-NeoX, and every other
method exports with its code (nanoponder/modeling_nanoponder.py and model.py beside the weights, an auto_map in
config.json), so that AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) gives nanoPonder's logits,
loss and generation, on tiny random models exported here; without trust_remote_code transformers refuses the
directory.

    python -m pytest tests/test_export.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
from model import GPT, GPTConfig
from nanoponder.hf import jacobi_train_range_from_hf, load_pretrained, read_config, save_pretrained
from nanoponder.methods import method_fields
from helpers import ENV, ROOT, TINY_MODEL, assert_one_error, randomize, randomize_matrices, tiny, write_checkpoint
from test_hf import OFFICIAL_KEYS

transformers = pytest.importorskip('transformers')

WORDS = ['the', 'cat', 'dog', 'sat', 'on', 'a', 'mat', 'ran', 'far', 'red', 'café', '🙂']
V = 300  # the tokenizer's ids fit, and the last row is free for Pause's vector
METHODS = ['ponderlm2-k1', 'ponderlm2-k2', 'ponderlm1-n2', 'pause-k2', 'loop-k1', 'hidden-n2']
FILES = ['config.json', 'model.py', 'model.safetensors', 'modeling_nanoponder.py', 'tokenizer.json',
         'tokenizer_config.json']


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    return tiny_tokenizer(WORDS, max_words=10)


# -----------------------------------------------------------------------------
# save_pretrained and export_hf.py

@pytest.mark.parametrize('kw', [dict(), dict(n_thoughts=2, n_jacobi=4, jacobi_train_range=(1, 5)),
                                dict(n_ponder=3, ponder_multiply=True), dict(scale_embeds=False),
                                dict(n_pause=2, pause_token_id=299), dict(n_loop=2), dict(n_hidden=2),
                                # another factor than the official one, folded into embed_in (the CPU experiment's
                                # controls vanilla-scale and hidden-scale, and a number)
                                dict(embed_scale_rule='sqrt2.5H', init_shrink_passes=2),
                                dict(n_hidden=1, embed_scale_rule='sqrt2.5H'), dict(n_ponder=2, embed_scale_rule='0.5')])
def test_export_round_trips_through_from_pretrained(tmp_path, tokenizer_json, kw):
    train_range = kw.pop('jacobi_train_range', None)  # a setting of the training run, which the export records
    model = randomize(tiny(vocab_size=300, **kw), std=0.1)
    save_pretrained(model, str(tmp_path), tokenizer_json, jacobi_train_range=train_range)
    code = ['model.py', 'modeling_nanoponder.py'] if model.config.method != 'vanilla' else []  # the tests below
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
    assert ('pause_token_id' in hf) == (model.config.n_pause > 0)  # transformers checks a *_token_id it finds


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


def test_a_tokenizer_or_weights_that_do_not_fit_the_model_are_refused_before_any_work(monkeypatch, tmp_path,
                                                                                     tokenizer_json):
    """export_hf.py --tokenizer=<a 50K-id tokenizer> on a small model exited 0 (transformers then failed with an
    IndexError), and sample.py refused it only at a prompt id beyond the vocabulary: every script now refuses a
    tokenizer with more ids than the model (nanoponder.tokenizer.model_tokenizer). A model whose weights are not
    finite (sample.py: torch.multinomial's RuntimeError) is refused where every script loads it."""
    from tokenizers import Tokenizer, models
    import export_hf
    from nanoponder.checkpoint import load_init_from
    big = tmp_path / 'big.json'
    Tokenizer(models.WordLevel({'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, 1000)}},
                               unk_token='<|endoftext|>')).save(str(big))
    hf = tmp_path / 'hf'
    save_pretrained(new_model('ponderlm2-k1'), str(hf), tokenizer_json)
    for key, value in (('init_from', str(hf)), ('out', str(tmp_path / 'out')), ('tokenizer', str(big))):
        monkeypatch.setattr(export_hf, key, value)
    with pytest.raises(ev.UserError, match=f"has 1,000 ids, more than the model's vocabulary of {V}"):
        export_hf.main()
    assert not (tmp_path / 'out').exists()
    set_weight(hf, 'embed_out.weight', (3, 5), float('nan'))
    with pytest.raises(ev.UserError, match='not finite.*embed_out.weight.*diverged'):
        load_init_from(str(hf), 'out')
    r = subprocess.run([sys.executable, 'sample.py', f'--init_from={hf}', '--max_new_tokens=2', '--device=cpu'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # the script of the report
    assert_one_error(r, 2, 'not finite (NaN or inf) in embed_out.weight', 'earlier checkpoint')


def set_weight(directory, name, index, value):
    """One weight of directory/model.safetensors set to value, in the file."""
    from safetensors.torch import load_file, save_file
    path = str(directory / 'model.safetensors')
    tensors = load_file(path)
    tensors[name][index] = value
    save_file(tensors, path, metadata={'format': 'pt'})


# -----------------------------------------------------------------------------
# the export in transformers, as itself (trust_remote_code=True)

def new_model(name, **config):
    """A tiny model of the method with weights large enough that its logits are far from uniform (random matrices
    only: see randomize_matrices)."""
    cfg = {**TINY_MODEL, 'vocab_size': V, **method_fields(name), 'pause_token_id': V - 1, **config}
    model = randomize_matrices(GPT(GPTConfig(**cfg)), std=1.0)
    return model.eval()


@pytest.fixture(scope='module', params=METHODS)
def exported(request, tmp_path_factory, tokenizer_json):
    """(our model, its export loaded by transformers with trust_remote_code, the directory)."""
    model = new_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    save_pretrained(model, str(path), tokenizer_json)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    return model, hf, path


def prompt_thoughts(model, T):
    """Enough Jacobi passes for a T-token prompt's thoughts to be exact, so that cached greedy decoding can be held
    to the uncached reference token for token (as tests/test_thoughts.py does)."""
    return {'n_jacobi': model.exact_passes(T)} if model.config.n_thoughts else {}


def test_the_export_loads_as_itself_with_its_logits_and_loss(exported):
    model, hf, path = exported
    assert sorted(os.listdir(path)) == FILES
    assert type(hf).__name__ == 'NanoPonderForCausalLM'
    for key in ('method', 'n_jacobi', 'block_size', 'ponder_multiply', 'scale_embeds', 'rotary_pct'):
        assert getattr(hf.gpt_neox.config, key) == getattr(model.config, key), key
    if model.config.n_pause:
        assert hf.gpt_neox.config.pause_token_id == model.config.pause_token_id
    idx = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        out = hf(idx, labels=idx)
        _, ours_loss = model(idx[:, :-1], idx[:, 1:])
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(out.logits, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ours_loss, atol=1e-5, rtol=1e-5)
    if model.config.n_thoughts:  # an explicit n_jacobi, and exact thoughts through the config
        with torch.no_grad():
            torch.testing.assert_close(hf(idx, n_jacobi=1).logits, model(idx, n_jacobi=1)[0], atol=1e-5, rtol=1e-5)
            exact = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                                      thoughts='exact').eval()
            torch.testing.assert_close(exact(idx).logits, model.sequential_logits(idx), atol=1e-5, rtol=1e-5)


def test_greedy_generate_is_nanoponders_cached_and_uncached(exported):
    model, hf, _ = exported
    for B in (1, 2):  # one sequence, and an unpadded batch
        prompt = torch.randint(0, V - 1, (B, 6), generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            ours = model.generate(prompt, 20, temperature=0, **prompt_thoughts(model, 6))
            assert torch.equal(ours, model.generate(prompt, 20, temperature=0, use_cache=False))
            cached = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True,
                                 **prompt_thoughts(model, 6))
            uncached = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
        assert torch.equal(cached, ours) and torch.equal(uncached, ours)
        assert len(set(ours[:, 6:].flatten().tolist())) > 2  # not one token over and over


def test_without_trust_remote_code_transformers_refuses(exported):
    _, _, path = exported
    with pytest.raises(ValueError, match='trust_remote_code=True'):
        transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False)
    with pytest.raises(ValueError, match='trust_remote_code=True'):
        transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def test_sampling_eos_and_padding(tokenizer_json, tmp_path):
    model = new_model('ponderlm2-k1')
    save_pretrained(model, str(tmp_path), tokenizer_json)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    prompt = torch.randint(0, V - 1, (2, 6), generator=torch.Generator().manual_seed(3))
    for options in (dict(temperature=0.9, top_k=20, top_p=0.9), dict(temperature=1.3, top_k=None)):
        runs = []
        for use_cache in (True, False):  # the same seed: the same draws from the same logits
            torch.manual_seed(7)
            with torch.no_grad():
                runs.append(hf.generate(prompt, max_new_tokens=15, do_sample=True, use_cache=use_cache, **options,
                                        **prompt_thoughts(model, 6)))
        torch.manual_seed(7)  # transformers' temperature, top-k and top-p warpers keep what model.sample keeps
        ours = model.generate(prompt, 15, **options, **prompt_thoughts(model, 6))
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], ours) and ours.shape == (2, 21)
    greedy = model.generate(prompt[:1], 12, temperature=0, **prompt_thoughts(model, 6))
    eos = greedy[0, 9].item()  # the 4th new token as the end: generation stops right after it
    with torch.no_grad():
        out = hf.generate(prompt[:1], max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          **prompt_thoughts(model, 6))
    first = 6 + greedy[0, 6:].tolist().index(eos)
    assert torch.equal(out, greedy[:, :first + 1])
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    with pytest.raises(ValueError, match='padded batches are not supported'):
        hf.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match='beam search is not supported'):
        hf.generate(prompt[:1], max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match='max_position_embeddings'):
        hf.generate(prompt, max_new_tokens=TINY_MODEL['block_size'], do_sample=False)


def test_bfloat16_and_save_pretrained_round_trip(tokenizer_json, tmp_path):
    model = new_model('ponderlm2-k1')
    save_pretrained(model, str(tmp_path / 'a'), tokenizer_json)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'a'), trust_remote_code=True,
                                                           dtype=torch.bfloat16).eval()
    ours = load_pretrained(str(tmp_path / 'a')).to(torch.bfloat16).eval()
    idx = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert hf.embed_out.weight.dtype == torch.bfloat16
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=0, rtol=0)
        prompt = idx[:1, :6]
        assert torch.equal(hf.generate(prompt, max_new_tokens=10, do_sample=False, n_jacobi=5),
                           ours.generate(prompt, 10, temperature=0, n_jacobi=5))
    # transformers' own save_pretrained writes the code again: the copy loads in transformers and in nanoPonder
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'a'), trust_remote_code=True)
    fp32.save_pretrained(str(tmp_path / 'b'))
    assert {'model.py', 'modeling_nanoponder.py'} <= set(os.listdir(tmp_path / 'b'))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'b'), trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, model(idx)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_pretrained(str(tmp_path / 'b'))(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_an_export_interrupted_between_its_files_is_no_model_and_the_next_one_is_whole(tokenizer_json, tmp_path,
                                                                                      monkeypatch):
    """export_hf.py --overwrite=True over a vanilla export, killed between its files, left the new model.safetensors
    beside the old vanilla config.json, which loaded silently as a mix. Interrupted after its first file is in
    place, the directory is no model now (no config.json: every loader refuses it in one line), the user's own file
    in it stays, no temp file is left, and the next export writes a whole model."""
    from nanoponder import hf as hf_module
    from nanoponder.checkpoint import resolve_init_from
    from nanoponder.runtime import UserError
    out = tmp_path / 'hf'
    save_pretrained(new_model('vanilla'), str(out), tokenizer_json)
    (out / 'README.md').write_text('my model card')
    moved, move = [], hf_module.move_into_place

    def interrupted(path):
        moved.append(path)
        if len(moved) == 2:
            raise KeyboardInterrupt
        move(path)
    monkeypatch.setattr(hf_module, 'move_into_place', interrupted)
    k1 = new_model('ponderlm2-k1')
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(k1, str(out), tokenizer_json)
    monkeypatch.undo()
    assert not (out / 'config.json').exists() and (out / 'README.md').read_text() == 'my model card'
    assert not [n for n in os.listdir(out) if '.tmp' in n]
    with pytest.raises(UserError, match='no config.json'):
        resolve_init_from(str(out), 'out')
    save_pretrained(k1, str(out), tokenizer_json)
    assert sorted(os.listdir(out)) == sorted(FILES + ['README.md'])
    idx = torch.randint(0, V - 1, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(str(out))(idx)[0], k1(idx)[0], atol=1e-5, rtol=1e-5)
    # a vanilla export over it leaves none of the code that k1's config.json named; in a directory whose files no
    # export of ours wrote, a model.py and name.tmpN files stay (only a killed export's own temp files go)
    save_pretrained(new_model('vanilla'), str(out), tokenizer_json)
    assert not (out / 'model.py').exists() and not (out / 'modeling_nanoponder.py').exists()
    mine = tmp_path / 'mine'
    mine.mkdir()
    for name in ('model.py', 'notes.txt.tmp4194999', 'log.tmp99999999999999999999', 'config.json.tmp4194999'):
        (mine / name).write_text('mine')
    save_pretrained(new_model('vanilla'), str(mine), tokenizer_json)
    assert not (mine / 'config.json.tmp4194999').exists()  # (no process has that id: above pid_max)
    assert all((mine / n).read_text() == 'mine' for n in ('model.py', 'notes.txt.tmp4194999',
                                                            'log.tmp99999999999999999999'))


def readme_snippet():
    """The README's transformers snippet (the python block that loads 'you/shakespeare-ponder'), as written there."""
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    blocks = readme.split('```python\n')[1:]
    (snippet,) = [b.split('```')[0] for b in blocks if "'you/shakespeare-ponder'" in b]
    return snippet


def test_the_readme_snippet_loads_every_export_without_a_prompt_or_a_warning(tokenizer_json, tmp_path):
    """The README's snippet, run as written (with a local directory for the hub id) on the export of every method and
    of vanilla, in one process with stdin closed: no trust_remote_code prompt, no warning, and text comes out."""
    snippet = readme_snippet()
    runs = []
    for name in ['vanilla'] + METHODS:
        path = tmp_path / name
        default = {} if name.startswith('pause') else {'pause_token_id': GPTConfig.pause_token_id}  # beyond V
        save_pretrained(new_model(name, **default), str(path), tokenizer_json)
        runs.append(snippet.replace("'you/shakespeare-ponder'", repr(str(path))).replace('max_new_tokens=64',
                                                                                             'max_new_tokens=4'))
    code = 'import warnings\nwarnings.simplefilter("always")\n' + '\nprint("---")\n'.join(runs)
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for sign in ('[y/N]', 'custom code', 'pause_token_id', 'Warning', 'warning', 'model of type'):
        assert sign not in out, out[-3000:]
    assert len(r.stdout.split('---')) == 1 + len(METHODS)


def test_sample_py_greedy_text_is_transformers_generate(tokenizer_json, tmp_path):
    """sample.py on the export, greedy, 20 tokens, against generate on the same directory in transformers. sample.py
    installs the kernels (the prompt's attention in blocks, ~1e-6 from SDPA in fp32) and the export runs model.py's
    plain path: on a near-tie between two logits a late greedy token could flip; this model and prompt have none, and
    the logits themselves are compared to 1e-5 in test_the_export_loads_as_itself_with_its_logits_and_loss."""
    model = new_model('ponderlm2-k1')
    save_pretrained(model, str(tmp_path), tokenizer_json)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = 'the cat sat on a mat'
    ids = tok(text, return_tensors='pt')['input_ids']
    T = ids.size(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=20, do_sample=False, n_jacobi=model.exact_passes(T))
    r = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path}', f'--start={text}', '--temperature=0',
                        '--max_new_tokens=20', f'--n_jacobi={model.exact_passes(T)}', '--dtype=float32',
                        '--device=cpu'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip('\n') == tok.decode(out[0])
    # adaptive thoughts (think_threshold, a config value from_pretrained overrides): generate is model.generate
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True,
                                                           think_threshold=0.3).eval()
    model.think_threshold = 0.3
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, model.generate(ids, 20, temperature=0))
        model.think_threshold = 1.0
        assert not torch.equal(out, model.generate(ids, 20, temperature=0))  # tau 0.3 skips and changes the text
        hf.config.think_threshold = 1.5  # (from_pretrained sets it after the config's own check)
        with pytest.raises(ValueError, match='think_threshold must be a number in'):
            hf.generate(ids, max_new_tokens=2, do_sample=False)
        hf.config.think_threshold = 0.3
        with pytest.raises(ValueError, match='use_cache=True'):
            hf.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
