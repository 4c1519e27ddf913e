"""configurator.py: apply_overrides directly, the exec'd behaviour through a tiny script in a subprocess, and what the
scripts that exec it say: a directory given as a config file is one `error:` line, and every script's --help shows
each key with its value and comment.

    python -m pytest tests/test_configurator.py -q
"""
import os
import subprocess
import sys

import pytest

from configurator import ConfigError, apply_overrides, known_config
from helpers import ENV, ROOT, assert_one_error

SCRIPT = f'''"""A tiny script: python script.py --batch_size=8"""
import os
batch_size = 4
learning_rate = 1e-3
compile = True
device = 'cuda'
betas = (0.9, 0.95)
init_from = None
_private = 'not config'
def helper(): pass
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
print(repr((batch_size, learning_rate, compile, device, betas, init_from)))
'''


def namespace():
    import math
    return {'batch_size': 4, 'learning_rate': 1e-3, 'compile': True, 'device': 'cuda', 'betas': (0.9, 0.95),
            'layers': [1, 2], 'init_from': None, '_private': 1, 'math': math, 'helper': lambda: 0,
            'MAX_VOCAB': 65536}


def test_known_config_skips_modules_functions_constants_and_private_names():
    assert set(known_config(namespace())) == {'batch_size', 'learning_rate', 'compile', 'device', 'betas',
                                              'layers', 'init_from'}


@pytest.mark.parametrize('arg, key, expected', [
    ('--batch_size=8', 'batch_size', 8),
    ('--batch_size=1e3', 'batch_size', 1000),
    ('--learning_rate=3e-4', 'learning_rate', 3e-4),
    ('--learning_rate=1', 'learning_rate', 1.0),
    ('--compile=false', 'compile', False),
    ('--compile=FALSE', 'compile', False),
    ('--compile=True', 'compile', True),
    ('--device=cpu', 'device', 'cpu'),
    ("--device='mps'", 'device', 'mps'),
    ('--device=123', 'device', '123'),
    ('--betas=(0.8,0.9)', 'betas', (0.8, 0.9)),
    ('--betas=[0.8,0.9]', 'betas', (0.8, 0.9)),
    ('--layers=(3,)', 'layers', [3]),
    ('--init_from=resume', 'init_from', 'resume'),
    ('--init_from=12', 'init_from', 12),
])
def test_override_values(arg, key, expected):
    ns = namespace()
    assert apply_overrides([arg], ns) == {key: expected}
    assert ns[key] == expected and type(ns[key]) is type(expected)


def test_unknown_key_names_the_closest_key():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean learning_rate"):
        apply_overrides(['--learning_rat=1'], namespace())


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=0.5', 'batch_size must be int'),
    ('--learning_rate=fast', 'learning_rate must be float'),
    ('--compile=1', 'compile must be bool'),
    ('--betas=0.9', 'betas must be tuple'),
    ('--compile', 'expected --key=value'),
])
def test_bad_values_say_what_was_expected(arg, message):
    ns = namespace()
    with pytest.raises(ConfigError, match=message):
        apply_overrides(['--batch_size=16', arg], ns)
    assert ns['batch_size'] == 4  # nothing applied unless all arguments are valid


def test_config_file_then_override(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text('import math\n_scale = 2\nbatch_size = 8 * _scale\nlearning_rate = math.sqrt(4)\n'
                   'init_from = "resume"\n')
    ns = namespace()
    apply_overrides([str(cfg), '--learning_rate=5'], ns)
    assert (ns['batch_size'], ns['learning_rate'], ns['init_from']) == (16, 5.0, 'resume')


def test_config_file_errors(tmp_path):
    (tmp_path / 'typo.py').write_text('batchsize = 8\n')
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'.*did you mean batch_size"):
        apply_overrides([str(tmp_path / 'typo.py')], namespace())
    (tmp_path / 'broken.py').write_text('batch_size = (\n')
    with pytest.raises(ConfigError, match='line 1.*SyntaxError'):
        apply_overrides([str(tmp_path / 'broken.py')], namespace())
    with pytest.raises(ConfigError, match='config file not found'):
        apply_overrides([str(tmp_path / 'missing.py')], namespace())


def run_script(tmp_path, *args):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_exec_applies_overrides(tmp_path):
    (tmp_path / 'cfg.py').write_text('batch_size = 2\n')
    r = run_script(tmp_path, 'cfg.py', '--learning_rate=1', '--compile=false', '--device=cpu', '--betas=(0.5,0.6)',
                   '--init_from=gpt2')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == repr((2, 1.0, False, 'cpu', (0.5, 0.6), 'gpt2'))


@pytest.mark.parametrize('args, message', [
    (['--batch_sise=8'], 'did you mean batch_size'),
    (['--batch_size=big'], 'batch_size must be int'),
    (['missing.py'], 'config file not found: missing.py'),
    (['--helper=1'], "unknown config key 'helper'"),
    (['--_private=1'], "unknown config key '_private'"),
    (['exits.py'], 'config file exits.py exits (SystemExit(0)): a config file only sets keys'),  # was exit 0, silent
])
def test_exec_errors_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / 'exits.py').write_text('import sys\nbatch_size = 2\nsys.exit(0)\n')  # for the case below
    r = run_script(tmp_path, *args)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr


def test_exec_help_lists_keys(tmp_path):
    r = run_script(tmp_path, '--batch_size=8', '--help')
    assert r.returncode == 0 and 'A tiny script' in r.stdout
    assert '--batch_size=8' in r.stdout and "--device='cuda'" in r.stdout and '_private' not in r.stdout


def test_exec_leaves_only_the_scripts_own_names(tmp_path):
    script = tmp_path / 'names.py'
    script.write_text(f'''compile = True
def one_line(x): return 'mine'
before = set(globals()) | {{'before'}}
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
print(sorted(n for n in set(globals()) ^ before if not n.startswith('__')), compile, one_line(1))
''')
    r = subprocess.run([sys.executable, str(script), '--compile=false'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == '[] False mine'


# -----------------------------------------------------------------------------
# the scripts: their messages and --help

def run(*cmd):
    """python cmd... in the repository."""
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_directory_as_config_file_says_it_is_one(tmp_path):
    (tmp_path / 'my_config.py').write_text('batch_size = 2\n')
    r = run('train.py', str(tmp_path), '--device=cpu')
    assert_one_error(r, 2, 'is a directory, not a config file', 'key = value', 'my_config.py')
    assert 'not found' not in r.stderr


def test_train_help_shows_each_key_with_its_value_and_comment():
    r = run('train.py', '--help')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith('  --')}
    assert 'peak' in lines['--learning_rate=0.001']
    assert 'iterations between evaluations' in lines['--eval_interval=500']
    assert 'running mean' in lines['--beta1=0.9']
    assert 'AdamW' not in lines['--learning_rate=0.001']  # the section heading above it is no part of its comment


@pytest.mark.parametrize('script, key, words', [
    ('sample', '--temperature=0.8', '0 = greedy'),
    ('sample', '--jacobi_tol=None', '0 = exact'),  # a comment continued on the line below
    ('eval', "--out=''", 'results path'),
    ('experiments.bench', "--json=''", 'JSON'),
    ('prepare_data', "--dataset='minipile'", 'shakespeare'),
    ('export_hf', "--out=''", 'directory'),
])
def test_every_scripts_help_has_the_comments_of_its_keys(script, key, words):
    """format_help on each script's own globals (imported here: the same text as `python SCRIPT.py --help`)."""
    import importlib
    import configurator
    module = importlib.import_module(script)
    text = configurator.format_help(vars(module), module.__file__)
    assert text.startswith(module.__doc__.strip().splitlines()[0])
    line = next(line for line in text.splitlines() if line.startswith(f'  {key} '))
    assert words in line, line
