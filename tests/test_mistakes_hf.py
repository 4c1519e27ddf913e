"""
Hugging Face directories and the one --init_from rule (nanoponder.checkpoint.resolve_init_from) of sample.py, eval.py,
export_hf.py and train.py. A directory as the official PonderLM-2 / PonderingLM code saves it loads and samples;
a broken one, a missing path, a file that is no checkpoint are one `error:` line, the same in every script, and
touch nothing; a hub download that fails is exit 1 everywhere; export_hf.py replaces no model without
--overwrite=True. Every command runs as the user types it; the commands of one case run at the same time.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model import GPT, GPTConfig
from nanoponder.hf import (config_from_hf, jacobi_train_range_from_hf, load_pretrained, read_config, read_state_dict,
                           save_pretrained)
from nanoponder.checkpoint import Checkpoint, resolve_init_from
from nanoponder.runtime import UserError
from helpers import ENV, ROOT, TINY, assert_one_error, checksums, last_line, make_data

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
