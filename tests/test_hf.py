"""Reading Hugging Face directories (nanoponder.hf) and the official checkpoints: config.json's keys, the weights'
formats, a directory as the official PonderLM-2 / PonderingLM code or the baselines' files save one (it loads and
samples); a broken one, a missing path, a file that is no checkpoint are one `error:` line, the same in every script,
and touch nothing; the one --init_from rule of sample.py, eval.py, export_hf.py and train.py; export_hf.py replaces
no model without --overwrite=True.

    python -m pytest tests/test_hf.py -q
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from model import GPT, GPTConfig
from nanoponder.hf import (config_from_hf, jacobi_train_range_from_hf, load_pretrained, read_config, read_state_dict,
                           save_pretrained)
from nanoponder.checkpoint import Checkpoint, resolve_init_from
from nanoponder.runtime import UserError
from helpers import (ENV, ROOT, TINY, TINY_MODEL, assert_one_error, checksums, last_line, make_data, randomize, tiny,
                     write_checkpoint)
from test_methods import NEW, TOL, max_diff, new_model, reference, tokens

BLOCK = 64  # the context of the tiny models of the loading tests, tiny(block_size=BLOCK)
VOCAB = 320  # above the tiny tokenizer's ids, padded as Pythia pads its 50277 to 50304
SIZE = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)

# a stock GPT-NeoX config.json (the keys of Pythia's), tiny
STOCK = {'architectures': ['GPTNeoXForCausalLM'], 'bos_token_id': 0, 'eos_token_id': 0, 'hidden_act': 'gelu',
         'hidden_size': 32, 'initializer_range': 0.02, 'intermediate_size': 128, 'layer_norm_eps': 1e-05,
         'max_position_embeddings': 2048, 'model_type': 'gpt_neox', 'num_attention_heads': 2, 'num_hidden_layers': 2,
         'rotary_emb_base': 10000, 'rotary_pct': 0.25, 'tie_word_embeddings': False, 'torch_dtype': 'float32',
         'transformers_version': '4.46.1', 'use_cache': True, 'use_parallel_residual': True, 'vocab_size': VOCAB}
# exactly the keys the official loader (src/llamafactory/model/loader.py) writes, with the values of its quick
# start, scripts/quickstart_ponderlm2_pythia_70m.sh
PONDERLM2_KEYS = dict(output_hidden_states=False, num_latent_thoughts=1, num_jacobi_iterations=3,
                      random_jacobi_iterations=True, interpolation=False, interpolation_use_topk=False,
                      scale_embeds=True, recurrent_model=True, max_position_embeddings=64, classifier_dropout=0)
PONDERLM1_KEYS = dict(ponderinglm=True, pondering_steps=3, mutiply_pondering_steps=True, scale_embeds=True)


def run(*commands):
    """Run each command (the arguments after `python`) in the repository, all at the same time -> the results."""
    def one(args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(one, commands))


def command(script, init_from, tmp, *extra):
    """The command line of script for init_from, writing under tmp."""
    options = {'sample.py': ['--max_new_tokens=5', '--temperature=0', '--dtype=float32', '--device=cpu'],
               'eval.py': [f'--out={tmp}/eval', '--dtype=float32', '--device=cpu'],
               'export_hf.py': [f'--out={tmp}/export'],
               'train.py': [*TINY, f'--data_dir={tmp}/data', f'--out_dir={tmp}/out']}[script]
    if script == 'train.py' and not (tmp / 'data').exists():
        make_data(tmp / 'data')
    return [script, *options, f'--init_from={init_from}', *extra]


def same_line(results):
    lines = {last_line(r.stderr) for r in results}
    assert len(lines) == 1, lines
    return lines.pop()


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    return tiny_tokenizer(['the', 'cat', 'sat', 'on', 'a', 'mat'])


def write_hf_dir(path, tokenizer_json, method_keys, **config):
    """A directory as the official code saves one: config.json (stock keys + method_keys), model.safetensors of
    random weights under Hugging Face's names, tokenizer.json. -> the model of config whose weights it holds."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SIZE, **config})).eval()
    save_pretrained(model, str(path), tokenizer_json)  # Hugging Face's names; its config.json is replaced:
    (path / 'config.json').write_text(json.dumps({**STOCK, **method_keys}, indent=2))
    return model


# -----------------------------------------------------------------------------
# reading a Hugging Face directory: config.json and the weights

def test_config_from_hf_reads_old_keys_and_ponder_keys():
    hf = dict(vocab_size=50304, num_hidden_layers=6, num_attention_heads=8, hidden_size=512,
              max_position_embeddings=2048, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False,
              layer_norm_eps=1e-6, num_latent_thoughts=2, num_jacobi_iterations=4, random_jacobi_iterations=False,
              scale_embeds=True)
    cfg = config_from_hf(hf)
    assert (cfg.rotary_pct, cfg.rotary_base, cfg.parallel_residual, cfg.layer_norm_eps) == (0.5, 5000, False, 1e-6)
    assert (cfg.n_thoughts, cfg.n_jacobi, jacobi_train_range_from_hf(hf), cfg.scale_embeds) == (2, 4, (4, 4), True)
    v1 = config_from_hf(dict(vocab_size=11, num_hidden_layers=1, num_attention_heads=1, hidden_size=8,
                             partial_rotary_factor=1.0, rope_theta=500.0, ponderinglm=True, pondering_steps=3,
                             mutiply_pondering_steps=True))
    assert (v1.n_ponder, v1.ponder_multiply, v1.rotary_pct, v1.rotary_base) == (3, True, 1.0, 500.0)


@pytest.mark.parametrize('key,value,match', [('interpolation', True, 'not supported'),
                                             ('hidden_act', 'relu', 'hidden_act')])
def test_unsupported_configs_are_clear_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(dict(vocab_size=11, num_hidden_layers=1, num_attention_heads=1, hidden_size=8, **{key: value}))


# every key the official code's config.json holds (test_export.py: an export writes them all)
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


def save_tiny_checkpoint(path, model, config_extra=None, fmt='safetensors', shards=1, dtype=None):
    from safetensors.torch import save_file
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    hf_config = dict(vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                     hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                     max_position_embeddings=cfg.block_size, rotary_pct=cfg.rotary_pct,
                     **(config_extra or {}))
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf_config, f)
    sd = {('' if k == 'embed_out.weight' else 'gpt_neox.') + k: v.to(dtype or v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    sd['gpt_neox.layers.0.attention.rotary_emb.inv_freq'] = torch.ones(2)  # old checkpoints carry buffers
    keys = sorted(sd)
    if fmt == 'bin':
        torch.save(sd, os.path.join(path, 'pytorch_model.bin'))
    elif shards == 1:
        save_file(sd, os.path.join(path, 'model.safetensors'))
    else:
        weight_map = {}
        for i in range(shards):
            name = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
            part = {k: sd[k] for k in keys[i::shards]}
            save_file(part, os.path.join(path, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'weight_map': weight_map}, f)
    return sd


@pytest.mark.parametrize('fmt,shards', [('safetensors', 1), ('safetensors', 3), ('bin', 1)])
def test_from_pretrained_round_trip_of_a_thought_model(tmp_path, fmt, shards):
    model = tiny(block_size=BLOCK, n_thoughts=2)
    save_tiny_checkpoint(tmp_path, model, dict(num_latent_thoughts=2, num_jacobi_iterations=3, scale_embeds=True),
                         fmt=fmt, shards=shards)
    loaded = load_pretrained(str(tmp_path)).eval()
    assert (loaded.config.n_thoughts, loaded.config.scale_embeds) == (2, True)
    idx = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_from_pretrained_loads_bf16_weights_and_overrides(tmp_path):
    model = tiny(block_size=BLOCK)
    save_tiny_checkpoint(tmp_path, model, dtype=torch.bfloat16)
    loaded = load_pretrained(str(tmp_path), n_jacobi=5)
    assert loaded.embed_in.weight.dtype == torch.float32 and loaded.config.n_jacobi == 5
    torch.testing.assert_close(loaded.embed_in.weight, model.embed_in.weight.bfloat16().float())
    with pytest.raises(ValueError, match='unknown GPTConfig'):
        load_pretrained(str(tmp_path), n_thought=1)


def test_missing_or_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import save_file
    sd = save_tiny_checkpoint(tmp_path, tiny(block_size=BLOCK))
    del sd['gpt_neox.layers.1.mlp.dense_h_to_4h.bias']
    sd['gpt_neox.layers.1.mlp.extra'] = torch.zeros(1)
    save_file(sd, os.path.join(tmp_path, 'model.safetensors'))
    with pytest.raises(ValueError, match=r'layers\.1\.mlp\.dense_h_to_4h\.bias.*layers\.1\.mlp\.extra'):
        load_pretrained(str(tmp_path))


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


def test_hub_download_failure_is_one_clear_error(monkeypatch):
    pytest.importorskip('huggingface_hub')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(RuntimeError, match='Hugging Face Hub'):
        load_pretrained('no-such-user/no-such-model-for-tests')


# -----------------------------------------------------------------------------
# what the official code writes

OFFICIAL = {'ponderlm2-quickstart': (PONDERLM2_KEYS, dict(n_thoughts=1, n_jacobi=3, block_size=64, scale_embeds=True)),
            'ponderlm1': (PONDERLM1_KEYS, dict(n_ponder=3, ponder_multiply=True, scale_embeds=True, block_size=2048))}


@pytest.fixture(scope='module')
def official_dirs(tmp_path_factory, tokenizer_json):
    """name -> (directory, the model whose weights it holds, the GPTConfig settings its keys mean)."""
    tmp = tmp_path_factory.mktemp('official')
    return {name: (tmp / name, write_hf_dir(tmp / name, tokenizer_json, keys, **settings), settings)
            for name, (keys, settings) in OFFICIAL.items()}


@pytest.fixture(scope='module')
def good_hf(official_dirs):
    """The official quick start's directory, the one the broken ones are copies of."""
    return official_dirs['ponderlm2-quickstart'][0]


@pytest.mark.parametrize('name', OFFICIAL)
def test_official_checkpoints_load(official_dirs, name):
    hf, model, settings = official_dirs[name]
    loaded = load_pretrained(str(hf)).eval()
    assert {k: getattr(loaded.config, k) for k in settings} == settings
    assert jacobi_train_range_from_hf(read_config(str(hf))) == (2, 4)  # random_jacobi_iterations: R in {2, 3, 4}
    idx = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_the_official_quickstart_checkpoint_samples(official_dirs, tmp_path):
    [r] = run(command('sample.py', official_dirs['ponderlm2-quickstart'][0], tmp_path))
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert 'generated 5 tokens' in last_line(r.stderr)


def test_official_vanilla_baseline_runs_unscaled():
    """The official vanilla baseline is stock GPT-NeoX: the scale_embeds its loader writes anyway does nothing."""
    vanilla = {**STOCK, **PONDERLM2_KEYS, 'recurrent_model': False, 'num_latent_thoughts': 0}
    assert config_from_hf(vanilla).scale_embeds is False
    assert config_from_hf({**STOCK, **PONDERLM2_KEYS}).scale_embeds is True


# the baselines (test_methods.py's tiny models and references): a stock GPT-NeoX config.json of helpers.TINY_MODEL's
# shape (Pythia's keys), and what the official loader adds
TINY_MODEL_STOCK = {
    'architectures': ['GPTNeoXForCausalLM'], 'bos_token_id': 0, 'eos_token_id': 0, 'hidden_act': 'gelu',
    'hidden_size': TINY_MODEL['n_embd'], 'initializer_range': 0.02, 'intermediate_size': 4 * TINY_MODEL['n_embd'],
    'layer_norm_eps': 1e-05, 'max_position_embeddings': TINY_MODEL['block_size'], 'model_type': 'gpt_neox',
    'num_attention_heads': TINY_MODEL['n_head'], 'num_hidden_layers': TINY_MODEL['n_layer'],
    'rotary_emb_base': 10000, 'rotary_pct': 0.25, 'tie_word_embeddings': False, 'torch_dtype': 'float32',
    'transformers_version': '4.46.1', 'use_cache': True, 'use_parallel_residual': True,
    'vocab_size': TINY_MODEL['vocab_size']}
PATCH = {'pause': 'pause', 'loop': 'loop', 'hidden': 'ponderlm'}  # our method -> the official --patch_method


def official_keys(config):
    """The keys the official loader writes (src/llamafactory/model/loader.py), for config's method; the Pause
    file reads pause_token_id too. None says which modeling file trained the model."""
    keys = dict(output_hidden_states=False, num_latent_thoughts=config.n_pause or config.n_loop or config.n_hidden,
                num_jacobi_iterations=3, random_jacobi_iterations=True, interpolation=False,
                interpolation_use_topk=False, scale_embeds=True, recurrent_model=True, classifier_dropout=0)
    if config.n_pause:
        keys['pause_token_id'] = config.pause_token_id
    return keys


@pytest.mark.parametrize('name', NEW)
def test_hf_export_round_trip_and_official_directories(tmp_path, name):
    model = new_model(name)
    idx = tokens((2, 7), 5)
    save_pretrained(model, str(tmp_path))
    loaded = load_pretrained(str(tmp_path)).eval()
    # the whole config comes back (the MLP width written out: None means 4 H)
    assert loaded.config == replace(model.config, n_inner=4 * model.config.n_embd) and loaded.config.method == name
    with torch.no_grad():
        logits, ref = model(idx)[0], reference(model, idx)
        assert torch.equal(loaded(idx)[0], logits)
    # the same weights as the official code saves them: its config.json names no method
    config = json.loads((tmp_path / 'config.json').read_text())
    assert 'patch_method' in config  # (our export's key, the only thing that would say)
    (tmp_path / 'config.json').write_text(json.dumps({**TINY_MODEL_STOCK, **official_keys(model.config)}))
    official = load_pretrained(str(tmp_path), patch_method=PATCH[name.split('-')[0]]).eval()
    assert official.config.method == name
    with torch.no_grad():
        assert max_diff(official(idx)[0], ref) < TOL, max_diff(official(idx)[0], ref)
    # without patch_method, num_latent_thoughts means PonderLM-2's thoughts (the official default, --patch_method
    # ours): the same directory is then a PonderLM-2 model with K = the method's count
    K = official_keys(model.config)['num_latent_thoughts']
    assert load_pretrained(str(tmp_path)).config.method == f'ponderlm2-k{K}'


def test_the_scripts_take_patch_method_for_an_official_directory(tmp_path, tiny_tokenizer):
    """sample.py --patch_method=pause samples an official Pause directory as Pause (greedy, as the model does); on a
    training checkpoint, which records its method, the option is one error line."""
    tokenizer_json = tiny_tokenizer(['the', 'cat', 'sat', 'on', 'a', 'mat'])
    model = new_model('pause-k2', vocab_size=300, pause_token_id=299)
    save_pretrained(model, str(tmp_path / 'hf'), tokenizer_json)
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**TINY_MODEL_STOCK, 'vocab_size': 300,
                                                             **official_keys(model.config)}))

    def sample(*args):
        return subprocess.run([sys.executable, 'sample.py', *args, '--start=', '--max_new_tokens=6', '--temperature=0',
                               '--compile=False', '--device=cpu', '--dtype=float32'],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)

    r = sample(f'--init_from={tmp_path / "hf"}', '--patch_method=pause')
    assert r.returncode == 0, r.stderr
    from nanoponder.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_json)
    expected = model.generate(torch.tensor([[tok.eos_id]]), 6, temperature=0)[0].tolist()
    assert r.stdout == tok.decode(expected[1:]) + '\n'  # (an empty prompt starts from EOS, which is not printed)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path)
    r = sample(f'--init_from={tmp_path / "ckpt.pt"}', '--patch_method=pause')
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: patch_method=pause')
    assert r.stderr.count('error:') == 1 and 'Traceback' not in r.stderr


# -----------------------------------------------------------------------------
# a broken Hugging Face directory: one line, the same in all four scripts

def edit_config(**changes):
    """A breaker: config.json with these keys changed (None: removed)."""
    def edit(hf):
        config = json.loads((hf / 'config.json').read_text())
        config.update(changes)
        (hf / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return edit


def write(name, data):
    return lambda hf: (hf / name).write_bytes(data)


def truncate(hf):
    data = (hf / 'model.safetensors').read_bytes()
    (hf / 'model.safetensors').write_bytes(data[:len(data) // 2])


SCRIPTS = ('sample.py', 'eval.py', 'export_hf.py', 'train.py')


BROKEN = [  # (breaker, the words of its line)
    (write('config.json', b'[1, 2]'), ['config.json', 'JSON list']),
    (edit_config(vocab_size=None), ['config.json lacks vocab_size']),
    (edit_config(num_attention_heads='2'), ['num_attention_heads="2"', 'integer >= 1']),
    (edit_config(num_attention_heads=0), ['num_attention_heads=0', 'integer >= 1']),
    (write('config.json', b'{"vocab_size": 320,'), ['config.json is not JSON']),
    (edit_config(num_attention_heads=3), ['hidden_size=32', 'not divisible by num_attention_heads=3']),
    (edit_config(interpolation=True), ['interpolation=true', 'not supported']),
    (truncate, ['model.safetensors', 'damaged']),
    (lambda hf: os.remove(hf / 'model.safetensors'), ['no model.safetensors']),
]


@pytest.mark.parametrize('case', range(len(BROKEN)), ids=[
    'config-list', 'no-vocab_size', 'heads-string', 'heads-0', 'config-not-json', 'heads-not-dividing',
    'interpolation', 'weights-truncated', 'weights-missing'])
def test_a_broken_hugging_face_directory_is_one_line_in_every_script(good_hf, tmp_path, case):
    """The first case in all four scripts (the same line), each other case in one of them in turn: they all load
    through runtime.load_hf_model, and a run of each script per case would cost a minute."""
    breaker, needles = BROKEN[case]
    hf = tmp_path / 'hf'
    shutil.copytree(good_hf, hf)
    breaker(hf)
    before = checksums(hf)
    results = run(*(command(s, hf, tmp_path) for s in (SCRIPTS if case == 0 else [SCRIPTS[case % 4]])))
    for r in results:
        assert_one_error(r, 2, f'cannot load the Hugging Face model {hf}', *needles)
    same_line(results)
    assert checksums(hf) == before
    assert not (tmp_path / 'export').exists() and not (tmp_path / 'out' / 'ckpt.pt').exists()


def test_unreadable_weight_files_name_the_file(good_hf, tmp_path):
    hf = tmp_path / 'hf'
    shutil.copytree(good_hf, hf)
    os.remove(hf / 'model.safetensors')
    (hf / 'pytorch_model.bin').write_text('not a pickle')
    with pytest.raises(ValueError, match='cannot read the weights file .*pytorch_model.bin'):
        read_state_dict(str(hf))
    (hf / 'model.safetensors.index.json').write_text('{"weight_map": {"embed_out.weight": "part-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match='part-1.safetensors is missing'):
        read_state_dict(str(hf))
    (hf / 'model.safetensors.index.json').write_text('[]')
    with pytest.raises(ValueError, match='index.json is no sharded-weights index'):
        read_state_dict(str(hf))


# -----------------------------------------------------------------------------
# the one rule for --init_from

@pytest.mark.parametrize('name, kind', [
    ('owner/name', 'hub'), ('gpt2', 'hub'), ('zeng123/PonderLM-2-Pythia-1.4b', 'hub'),
    ('./nope', None), ('~/no-such-dir-for-tests', None), ('/no/such', None), ('a/b/c', None), ('nope.pt', None),
    ('some model', None), ('runs/nope', None),  # runs/ exists here: a path in it, not a hub id
])
def test_a_name_is_a_hub_id_only_where_it_cannot_be_a_local_path(tmp_path, monkeypatch, name, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'runs').mkdir()
    if kind:
        assert resolve_init_from(name, 'out') == (kind, name)
    else:
        with pytest.raises(UserError, match=f'^no such file or directory: {name} '):
            resolve_init_from(name, 'out')


def test_a_file_of_a_hugging_face_directory_is_told_to_name_the_directory(good_hf):
    with pytest.raises(UserError, match=f'Hugging Face model directory {good_hf}: pass --init_from={good_hf}$'):
        resolve_init_from(str(good_hf / 'model.safetensors'), 'out')


@pytest.fixture(scope='module')
def ckpt_file(tmp_path_factory):
    """A train.py checkpoint under a name without .pt."""
    path = tmp_path_factory.mktemp('ckpt') / 'my-run.checkpoint'
    model = GPT(GPTConfig(**SIZE, block_size=16))  # vanilla: eval.py's loss of it is quick
    Checkpoint(model_args=vars(model.config), model=model.state_dict(), optimizer={}, scaler={}, iter_num=0,
               data_state={}, rng={}, best_val_loss=0.0, config={'data_dir': 'no-such-data'}).save(str(path))
    return path


def test_a_checkpoint_under_any_name_works_in_sample_eval_and_export(ckpt_file, tokenizer_json, tmp_path):
    text = tmp_path / 'text.txt'
    text.write_text('the cat sat on a mat\n' * 20)
    tok = f'--tokenizer={tokenizer_json}'
    results = run(command('sample.py', ckpt_file, tmp_path, tok),
                  command('eval.py', ckpt_file, tmp_path, tok, f'--text={text}', '--max_windows=1'),
                  command('export_hf.py', ckpt_file, tmp_path, tok))
    for r in results:
        assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / 'eval.json').read_text())['tokens'] > 0
    assert load_pretrained(str(tmp_path / 'export')).config.block_size == 16


@pytest.mark.parametrize('name', ['no-such-run/ckpt.pt', 'my_ckpt'])  # the second: no .pt, in a directory that is
def test_a_missing_local_path_is_the_same_line_in_sample_eval_and_export(tmp_path, name):
    missing = tmp_path / name
    results = run(*(command(s, missing, tmp_path) for s in ('sample.py', 'eval.py', 'export_hf.py')))
    for r in results:
        assert_one_error(r, 2, f'no such file or directory: {missing}', 'hub id')
    same_line(results)


def test_a_failed_download_is_exit_1_in_sample_and_train(tmp_path):
    results = run(*(command(s, 'no-such-user/no-such-model', tmp_path) for s in ('sample.py', 'train.py')))
    for r in results:
        assert_one_error(r, 1, "could not get 'no-such-user/no-such-model' from the Hugging Face Hub", 'offline',
                         'pass a local directory')
    same_line(results)


def write_pickle(path):
    with open(path, 'wb') as f:
        pickle.dump({'weights': [1, 2, 3]}, f)


@pytest.mark.parametrize('make, scripts, needles', [
    (None, ['sample.py'], ['init_from is empty', "'resume'", 'hub id']),
    (lambda p: p.write_text('hello world\n'), ['sample.py', 'eval.py'],  # were KeyError: 101 / weights_only advice
     ['as a train.py checkpoint', 'another kind of file']),
    (write_pickle, ['eval.py'], ['as a train.py checkpoint', 'another kind of file']),
    (lambda p: p.mkdir(), ['sample.py'], ['is a directory but no Hugging Face model directory', 'no config.json']),
], ids=['empty', 'text-file', 'foreign-pickle', 'dir-without-config'])
def test_what_init_from_names_is_said_truthfully(tmp_path, make, scripts, needles):
    name = tmp_path / 'thing' if make else ''
    if make:
        make(name)
    before = name.read_bytes() if make and name.is_file() else None
    results = run(*(command(s, name, tmp_path) for s in scripts))
    for r in results:
        assert_one_error(r, 2, *needles)
        assert 'weights_only' not in r.stderr and 'KeyError' not in r.stderr
    same_line(results)
    if before is not None:
        assert name.read_bytes() == before


def test_train_py_says_what_to_do_with_a_checkpoint_file(ckpt_file, tmp_path):
    [r] = run(command('train.py', ckpt_file, tmp_path))
    assert_one_error(r, 2, 'train.py checkpoint', '--init_from=resume')


# -----------------------------------------------------------------------------
# export_hf.py replaces no model

@pytest.mark.parametrize('held, overwrite, needles', [
    (['model.safetensors'], False, ['already holds a model (model.safetensors)', '--overwrite=True']),
    (['config.json', 'model.safetensors.index.json'], True, ['model.safetensors.index.json', 'does not replace']),
], ids=['weights-without-config', 'shard-index-with-overwrite'])
def test_export_replaces_no_model_without_overwrite(good_hf, tmp_path, held, overwrite, needles):
    out = tmp_path / 'export'
    out.mkdir()
    for name in held:
        (out / name).write_text(f'the user\'s {name}')
    before = checksums(out)
    [r] = run(command('export_hf.py', good_hf, tmp_path, f'--overwrite={overwrite}'))
    assert_one_error(r, 2, *needles)
    assert checksums(out) == before
