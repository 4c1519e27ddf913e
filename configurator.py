"""
Command-line configuration, nanoGPT style. A script defines its config as plain module globals, then does

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

and the command line overrides them, in order:

    python train.py config/pythia70m_ponder.py --batch_size=8 --learning_rate=3e-4 --compile=false
    python train.py --jacobi_train_range='(2,4)' --out_dir=out/run1   # quoted: (, [ and * are the shell's
    python train.py --help      # lists the known keys, each with its current value and its comment

An argument without `--` is a config file, exec'd into a scratch namespace; every name it sets must be a
known key (it may import modules and use `_private` helper names freely). `--key=value` sets one key; the
value is parsed with ast.literal_eval, falling back to the raw string for str keys, and must match the
type of the current value (an int may set a float, true/false in any case set a bool, a key whose default
is None takes anything). Mistakes print one `error: ...` line on stderr and exit with status 2 (under
torchrun only rank 0 prints). The keys that were set are echoed as `config: key = value` on stdout, or on
stderr where the script sets `_config_echo = 'stderr'` (a script whose stdout is its product).

Known keys are the script's public globals holding plain config values (bool, int, float, str, None,
tuple, list, dict): modules, functions, classes, `_names` and UPPER_CASE constants are not config (known_config,
the one rule). Imported (`import configurator`) it only defines things: apply_overrides(args, namespace) then
raises ConfigError instead of exiting.
"""
_namespace_before = dict(globals())  # when exec'd: the script's names, to put back once we are done
import ast
import builtins
import difflib
import io
import os
import sys
import tokenize
import types

_CONFIG_TYPES = (bool, int, float, str, type(None), tuple, list, dict)


class ConfigError(ValueError):
    """A user mistake on the command line or in a config file; the message is one line."""


def known_config(namespace):
    """The config keys of a script namespace with their current values: what --key=value may set, --help lists
    and a script records as its config."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, _CONFIG_TYPES)}  # UPPER = constants


def unknown_key_error(key, known, where):
    close = difflib.get_close_matches(key.replace('-', '_'), list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def type_name(value):
    return 'None' if value is None else type(value).__name__


def check_value(key, value, current, where):
    """Return value, converted where harmless (int -> float, list <-> tuple), if it suits the key's type."""
    if current is None:
        return value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # --max_iters=1e5
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(current)(value) if ok else value
    else:  # str, dict
        ok = isinstance(value, type(current))
    if not ok:
        raise ConfigError(f"{where}: {key} must be {type_name(current)} (default {current!r}), "
                          f"got {type_name(value)} {value!r}")
    return value


def parse_value(raw, current):
    """Turn the text after `--key=` into a Python value, guided by the key's current value."""
    if raw.lower() in ('true', 'false'):
        return raw.lower() == 'true'
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw  # a bare word like cuda or out/run1: a string
    if isinstance(current, str) and not isinstance(value, str):
        value = raw  # --out_dir=123 means the directory '123'
    if current is None and not isinstance(value, _CONFIG_TYPES):
        value = raw
    return value


def one_line(text):
    return ' '.join(str(text).split())


def read_config_file(path, known):
    """Exec a config file into a scratch namespace and return the config keys it sets."""
    if os.path.isdir(path):
        try:
            files = sorted(n for n in os.listdir(path) if n.endswith('.py'))
            held = f"in it: {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}" if files else "it holds none"
        except OSError as e:
            held = f"it cannot be listed: {e.strerror}"
        raise ConfigError(f"{path} is a directory, not a config file: name a Python file of key = value lines "
                          f"({held})")
    if not os.path.isfile(path):
        hint = ' (options are written --key=value)' if '=' in path else ''
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        # builtins.*: the script's globals are ours when exec'd, and `compile = True` is a common config key
        with builtins.open(path, encoding='utf-8') as f:
            source = f.read()
        scratch = {}
        builtins.exec(builtins.compile(source, path, 'exec'), scratch)
    except SystemExit as e:  # sys.exit() in the file: the script would end there, with an exit code that lies
        raise ConfigError(f"config file {path} exits (SystemExit({e.code!r})): a config file only sets keys, "
                          f"key = value") from None
    except Exception as e:  # the user's file is broken: say where, in one line
        line = getattr(e, 'lineno', None)
        at = f" (line {line})" if line else ''
        message = e.msg if isinstance(e, SyntaxError) else e
        raise ConfigError(f"config file {path}{at}: {type(e).__name__}: {one_line(message)}") from None
    settings = {}
    for key, value in scratch.items():
        if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue  # imports and helpers are the file's own business
        if key not in known:
            raise unknown_key_error(key, known, path)
        settings[key] = check_value(key, value, known[key], path)
    return settings


def parse_override(arg, known):
    """'--key=value' -> (key, value)."""
    key, eq, raw = arg[2:].partition('=')
    if not eq:
        hint = f" (e.g. {arg}=True)" if isinstance(known.get(key), bool) else ''
        raise ConfigError(f"expected --key=value, got '{arg}'{hint}")
    if key not in known:
        raise unknown_key_error(key, known, f"'{arg}'")
    return key, check_value(key, parse_value(raw, known[key]), known[key], f"'{arg}'")


def apply_overrides(args, namespace):
    """Apply config files and --key=value args, in order, to namespace; return the changed keys.
    Nothing is changed unless every argument is valid."""
    known = known_config(namespace)
    changed = {}
    for arg in args:
        if arg.startswith('--'):
            settings = dict([parse_override(arg, {**known, **changed})])
        else:
            settings = read_config_file(arg, {**known, **changed})
        changed.update(settings)
    namespace.update(changed)
    return changed


def key_comments(tree, source):
    """{key: its comment} from a script's source: the comment beside each top-level assignment, with the comment
    lines indented under it that follow (a comment at column 0 is a section heading, not part of it)."""
    comments = {}  # line number -> (column, text) of each comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip('#').strip())
    lines, found = source.splitlines(), {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, 'target', None)]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            continue
        parts = [comments[n][1] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        n = node.end_lineno + 1
        while parts and n in comments and comments[n][0] > 0 and lines[n - 1].lstrip().startswith('#'):
            parts.append(comments[n][1])
            n += 1
        if parts:
            found[targets[0].id] = ' '.join(parts)
    return found


def script_help(script):
    """(docstring, {key: comment}) of a script, read from its file: its own __doc__ was just replaced by ours."""
    try:
        with builtins.open(script, encoding='utf-8') as f:
            source = f.read()
        tree = ast.parse(source)
        return (ast.get_docstring(tree) or '').strip(), key_comments(tree, source)
    except (OSError, SyntaxError, ValueError, tokenize.TokenError):
        return '', {}


def format_help(namespace, script):
    doc, comments = script_help(script)
    lines = [doc, ''] if doc else []
    lines += [f"usage: python {os.path.basename(script)} [config_file.py ...] [--key=value ...]",
              "config keys (current value, what it does):"]
    settings = [(f"--{k}={v!r}", comments.get(k, '')) for k, v in known_config(namespace).items()]
    width = min(max((len(s) for s, _ in settings), default=0), 40)  # a long value does not push every comment
    lines += [f"  {s:<{width}}  {c}".rstrip() for s, c in settings]
    return '\n'.join(lines)


def configure(argv, namespace):
    """What exec'ing this file does: apply argv to namespace, or print help / one error line and exit."""
    help_wanted = any(a in ('-h', '--help') for a in argv)
    talk = os.environ.get('RANK', '0') == '0'  # under torchrun only rank 0 speaks; every rank exits alike
    try:
        changed = apply_overrides([a for a in argv if a not in ('-h', '--help')], namespace)
    except ConfigError as e:
        if talk:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if help_wanted:
        if talk:
            print(format_help(namespace, sys.argv[0] if sys.argv else 'script.py'))
        sys.exit(0)
    if talk:  # a script whose stdout is its product sets _config_echo = 'stderr'
        echo = sys.stderr if namespace.get('_config_echo') == 'stderr' else sys.stdout
        try:
            for key, value in changed.items():
                print(f"config: {key} = {value!r}", file=echo)
        except BrokenPipeError:  # `| head -3` has read its lines and gone (unbuffered output meets it here): the
            # script goes on; its writes (and the exit's flush) go to /dev/null instead of failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), echo.fileno())
    return changed


def restore_namespace(namespace, before, keep):
    """Undo what exec'ing this file did to a script's globals (our imports, functions, a clobbered
    same-named helper of the script), keeping the config keys that were set."""
    for name in [n for n in namespace if n not in keep]:
        if name not in before:
            del namespace[name]
        elif namespace[name] is not before[name]:
            namespace[name] = before[name]


if __name__ != 'configurator':  # exec'd by a script: configure its globals, then leave only its own names
    restore_namespace(globals(), _namespace_before, keep=configure(sys.argv[1:], globals()))
