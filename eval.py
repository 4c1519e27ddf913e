"""
Evaluate a model the way the PonderLM papers report it, and answer what their reviewers asked:

- loss, perplexity and bits per byte of held-out text: a prepared split (prepare_data.py) or a raw text file
  tokenized with the model's own tokenizer, every token scored once, with a sliding window (--stride) where the
  text is longer than the context;
- for a PonderLM-2 model, the loss after R = 0..max_jacobi Jacobi passes (the parallel form that training runs) and
  with exact thoughts (one token at a time through the KV cache, as decoding computes them); per pass, how much the
  thoughts still move, ||z(r) - z(r-1)|| / ||z(r)||, and their distance to the exact thoughts, ||z(r) - z*|| / ||z*||;
  adaptive Jacobi (stop once the change is at most a tolerance): the passes it takes; the KV cache's bytes per token.
  A markdown table on stdout, PATH.json and a plot PATH_jacobi.png;
- downstream tasks through lm-evaluation-harness (pip install lm-eval): a markdown table and PATH_tasks.json.

    python eval.py --init_from=out-shakespeare-ponder/ckpt.pt           # the val split of its training data
    python eval.py --init_from=out/ckpt.pt --data_dir=data/minipile --split=test --max_windows=500
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-410m --text=wiki.test.raw --block_size=2048 --stride=1024
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --tasks=lambada_openai,arc_easy --num_fewshot=0
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --tasks=piqa --thoughts=jacobi --n_jacobi=3
    python eval.py --init_from=path/to/hf_dir --tasks=my_task --task_dir=path/to/task_yamls --limit=100

--init_from: 'resume' (out_dir/ckpt.pt), a train.py checkpoint, a Hugging Face directory or hub id. The tokenizer is
the model's own (see sample.py), --tokenizer overrides it. Downstream tasks score with exact thoughts by default
(what decoding sees); --thoughts=jacobi scores with n_jacobi parallel passes (or adaptive to --jacobi_tol), as the
papers do. Results go to --out=PATH (a directory: PATH/eval; default: eval beside a ckpt.pt, else
eval-<model name>), checked to be writable before the evaluation starts.
The default dtype is float32 with TF32 off, so that the convergence figures are not floored by the dtype's rounding.
Exit codes: nanoponder/runtime.py.
"""
import math
import os
import sys
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import settled
from nanoponder.checkpoint import load_init_from, resolve_init_from
from nanoponder.cost import kv_cache_bytes_per_token, kv_cache_slots
from nanoponder.data import read_meta, read_tokens
from nanoponder.methods import check_thought_mode
from nanoponder.runtime import (UserError, autocast, check_output_file, failure, one_line, resolve_device,
                                resolve_dtype, run_cli, write_json, write_result)
from nanoponder.tokenizer import checkpoint_data_dir, data_dir_tokenizer, model_tokenizer, tokenizer_mismatch

# -----------------------------------------------------------------------------
# config: plain globals, overridden by config files and --key=value (configurator.py)
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a train.py checkpoint file, a Hugging Face directory or hub id
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
tokenizer = ''          # '' = the model's own; else pythia | gpt2 | path/to/tokenizer.json
patch_method = ''       # an official baseline's Hugging Face directory: ours | pause | loop | ponderlm | vanilla (its
                        # --patch_method); '' = config.json's patch_method (our exports write it), else ours
# loss: the text
data_dir = ''           # a prepared data directory; '' = a checkpoint's own training data
split = 'val'           # its split: val (or test, where prepare_data made one)
text = ''               # a raw UTF-8 text file instead: one document, scored after an EOS token
block_size = 0          # tokens per window; 0 = the model's context
stride = 0              # each window scores the tokens after the previous one's, the rest is context; 0 = block_size
batch_size = 8          # windows (or lm-eval requests) per forward
max_windows = 0         # score only the first windows; 0 = all
# loss: latent thoughts (PonderLM-2 models)
max_jacobi = 8          # the loss and the convergence after R = 0..max_jacobi Jacobi passes
jacobi_tols = (1e-2, 1e-3, 1e-4)  # adaptive Jacobi at each of these tolerances: the passes taken and the loss
exact = True            # also the exact thoughts, one token at a time through the KV cache (slower)
# downstream tasks (lm-evaluation-harness)
tasks = ''              # comma-separated task names: switches to downstream mode
num_fewshot = 0         # examples shown before each task question
limit = 0               # examples per task; 0 = all
task_dir = ''           # a folder of extra task YAMLs (lm-eval's include_path)
thoughts = 'exact'      # exact (what decoding sees) | jacobi (parallel passes, as the papers score)
n_jacobi = None         # with thoughts=jacobi: the passes; None = the model's own n_jacobi
jacobi_tol = None       # with thoughts=jacobi: adaptive passes to this tolerance instead of n_jacobi
max_gen_toks = 256      # generate_until: tokens at most, unless a task says otherwise
# output and system
out = ''                # results path without extension (a directory: DIR/eval); '' = eval beside a ckpt.pt, else
                        # eval-<model name>
device = 'auto'         # auto | cpu | cuda | cuda:1 | mps
dtype = 'float32'       # float32 | bfloat16 | float16 | auto (nanoponder.runtime.resolve_dtype); see above
seed = 1337             # of lm-eval's few-shot draws and of any sampling
# -----------------------------------------------------------------------------
_config_echo = 'stderr'  # configurator.py echoes the keys set on stderr: stdout is the results table



# -----------------------------------------------------------------------------
# the model

def load_model(init_from, out_dir='out', tokenizer_override='', patch_method=''):
    """-> (model on the CPU in fp32, its tokenizer, the Checkpoint or None). Every mistake is one UserError."""
    model, ckpt, source = load_init_from(init_from, out_dir, patch_method=patch_method)
    return model, model_tokenizer(source, ckpt, tokenizer_override), ckpt


def results_path(init_from, ckpt_file, out):
    """Where results go, without extension; ckpt_file: the train.py checkpoint init_from names, or None."""
    if out:  # a directory gets DIR/eval.json, not a hidden DIR/.json
        return os.path.join(out, 'eval') if out.endswith(('/', os.sep)) or os.path.isdir(out) else out
    if ckpt_file is not None:
        return os.path.join(os.path.dirname(os.path.abspath(ckpt_file)), 'eval')
    return 'eval-' + os.path.basename(os.path.normpath(init_from))


# -----------------------------------------------------------------------------
# the text: one stream of token ids, windows over it, and its bytes

def text_stream(path, tok):
    """A raw text file as token ids: the EOS token (context for the first token, as a new document starts in
    training) and then the text."""
    try:
        with open(path, encoding='utf-8') as f:
            content = f.read()
    except FileNotFoundError:
        raise UserError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text: {one_line(e)}") from None
    ids = tok.encode(content)
    if not ids:
        raise UserError(f"{path} is empty: nothing to score")
    return np.array([tok.eos_id] + ids, dtype=np.int64)


def data_stream(data_dir, split):
    """A prepared split as token ids (documents each followed by EOS, as training reads them) and its tokenizer."""
    read_meta(data_dir)
    ids = read_tokens(data_dir, split)
    if len(ids) < 2:
        raise UserError(f"{data_dir}/{split}.bin has {len(ids)} tokens: nothing to score")
    return ids, data_dir_tokenizer(data_dir)


def sliding_windows(n_tokens, block, stride):
    """Windows (start, end, first) over a stream of n_tokens ids: inputs ids[start:end-1], targets
    ids[start+1:end]; the targets from index `first` on are scored here, the ones before it are context that an
    earlier window scored. Window k starts at k*stride, so every target 1..n_tokens-1 is scored exactly once,
    with at least block - stride tokens of context after the first window."""
    windows, first, start = [], 1, 0
    while first < n_tokens:
        end = min(start + block + 1, n_tokens)
        windows.append((start, end, first))
        first, start = end, start + stride
    return windows


def utf8_bytes(tok, ids):
    """UTF-8 bytes of the text of ids, decoded a document at a time (split at EOS, so no character is cut);
    each EOS counts one byte, as the separator between documents."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tok.eos_id)
    total, begin = len(cuts), 0
    for cut in list(cuts) + [len(ids)]:
        if cut > begin:
            total += len(tok.decode(ids[begin:cut].tolist()).encode('utf-8'))
        begin = cut + 1
    return total


def window_batches(ids, windows, batch_size, device):
    """Yield x, y (B, L) int64 on device: inputs and targets of same-length windows, y = -1 where not scored."""
    by_length = {}
    for w in windows:
        by_length.setdefault(w[1] - w[0], []).append(w)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            rows = [np.asarray(ids[s:e], dtype=np.int64) for s, e, _ in group[i:i + batch_size]]
            batch = torch.from_numpy(np.stack(rows)).to(device)
            x, y = batch[:, :-1], batch[:, 1:].clone()
            for row, (s, _, first) in enumerate(group[i:i + batch_size]):
                y[row, :first - s - 1] = -1  # targets before `first` were scored by an earlier window
            yield x, y


def nats(logits, y):
    """Summed cross-entropy (natural log) of the scored targets y (B, T) under logits (B, T, V), a float."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction='sum').item()


# -----------------------------------------------------------------------------
# loss and convergence

class Totals:
    """Sums over the batches: nats per way of computing the thoughts, and squared norms for the convergence."""

    def __init__(self, max_r):
        self.nats = {}                      # row name -> summed nats
        self.change_sq = [0.0] * (max_r + 1)  # sum ||z(r) - z(r-1)||^2 (r >= 1)
        self.size_sq = [0.0] * (max_r + 1)    # sum ||z(r)||^2
        self.dist_sq = [0.0] * (max_r + 1)    # sum ||z(r) - z*||^2
        self.exact_sq = 0.0                   # sum ||z*||^2
        self.passes = {}                    # tolerance -> passes taken per batch

    def add(self, name, value):
        self.nats[name] = self.nats.get(name, 0.0) + value


def square(t):
    return (t.float() ** 2).sum().item()


def score_thought_batch(model, x, y, totals, max_r, tols, with_exact):
    """One batch of a PonderLM-2 model: the exact thoughts (model.sequential, as decoding computes them); the loss
    after r = 0..max_r Jacobi passes and the convergence of the thoughts, observed in one think run through its
    stop predicate; and adaptive Jacobi to each tolerance (settled), with the passes it took."""
    z_exact = None
    if with_exact:
        h, z_exact = model.sequential(x, model.new_caches(x.size(0), x.size(1), x.device))  # (B, T, C), (B, T, K, C)
        totals.add('exact', nats(model.embed_out(h), y))
        totals.exact_sq += square(z_exact)
    previous = None

    def observe(r, z, h):  # z (B, T, K, C): the thoughts after r passes; h (B, T, C) predicts from them
        nonlocal previous
        totals.add(f'R={r}', nats(model.embed_out(h), y))
        totals.size_sq[r] += square(z)
        if previous is not None:
            totals.change_sq[r] += square(z - previous)
        if z_exact is not None:
            totals.dist_sq[r] += square(z - z_exact)
        previous = z
        return False  # never stops: all max_r passes

    model.think(x, max_r, stop=observe)
    for tol in tols:
        taken, settle = [], settled(tol)

        def stop(r, z, h):  # settle, noting each pass: think returns after the last one seen
            taken.append(r)
            return settle(r, z, h)
        h = model.think(x, model.exact_passes(x.size(1)), stop=stop)
        totals.add(f'tol={tol:g}', nats(model.embed_out(h), y))
        totals.passes.setdefault(tol, []).append(taken[-1])


def evaluate_loss(model, ids, windows, ctx, device, batch_sz, max_r, tols, with_exact):
    """Score every window; returns the Totals."""
    totals = Totals(max_r)
    n_batches = sum(math.ceil(n / batch_sz) for n in window_counts(windows).values())
    with torch.no_grad(), ctx:
        for x, y in tqdm(window_batches(ids, windows, batch_sz, device), total=n_batches, desc='scoring',
                         unit='batch', file=sys.stderr, dynamic_ncols=True):
            if model.config.n_thoughts:
                score_thought_batch(model, x, y, totals, max_r, tols, with_exact)
            else:
                totals.add(model.config.method_label, nats(model(x)[0], y))
    return totals


def window_counts(windows):
    counts = {}
    for s, e, _ in windows:
        counts[e - s] = counts.get(e - s, 0) + 1
    return counts


def loss_rows(totals, n_targets, n_bytes, max_r, tols):
    """One dict per way of computing: loss (nats per token), perplexity, bits per byte, and for Jacobi rows the
    passes and the convergence figures."""
    def row(name, thoughts, passes, **extra):
        loss = totals.nats[name] / n_targets
        return dict(name=name, thoughts=thoughts, passes=passes, loss=loss, ppl=math.exp(min(loss, 700)),
                    bits_per_byte=totals.nats[name] / (math.log(2) * n_bytes), **extra)

    if 'R=0' not in totals.nats:  # no thoughts: one row
        (name,) = totals.nats
        return [row(name, 'none', None)]
    rows = []
    for r in range(max_r + 1):
        change = math.sqrt(totals.change_sq[r] / totals.size_sq[r]) if r else None
        dist = math.sqrt(totals.dist_sq[r] / totals.exact_sq) if totals.exact_sq else None
        rows.append(row(f'R={r}', 'jacobi', r, change=change, distance_to_exact=dist))
    for tol in tols:
        used = totals.passes[tol]
        rows.append(row(f'tol={tol:g}', 'adaptive', sum(used) / len(used), tol=tol, max_passes=max(used)))
    if 'exact' in totals.nats:
        rows.append(row('exact', 'exact', None))
    return rows


def fmt(value, spec='.4f'):
    return '-' if value is None else format(value, spec)


def loss_table(rows):
    lines = ['| thoughts | Jacobi passes | loss | ppl | bits/byte | change per pass | distance to exact |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        if r['thoughts'] == 'adaptive':
            what, passes = f"adaptive, tol {r['tol']:g}", f"{r['passes']:.2f} (max {r['max_passes']})"
        elif r['thoughts'] == 'exact':
            what, passes = 'exact (sequential, KV cache)', '-'
        else:
            what, passes = r['thoughts'], fmt(r['passes'], 'd')
        lines.append(f"| {what} | {passes} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{fmt(r.get('change'), '.2e')} | {fmt(r.get('distance_to_exact'), '.2e')} |")
    return '\n'.join(lines)


def plot_jacobi(rows, path, title):
    """Loss against Jacobi passes (exact as a line), and the convergence figures on a log scale."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("note: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return None
    jacobi = [r for r in rows if r['thoughts'] == 'jacobi']
    exact_rows = [r for r in rows if r['thoughts'] == 'exact']
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    passes = [r['passes'] for r in jacobi]
    left.plot(passes, [r['loss'] for r in jacobi], 'o-', label='Jacobi, R passes')
    if exact_rows:
        left.axhline(exact_rows[0]['loss'], color='k', linestyle='--', label='exact (sequential)')
    left.set(xlabel='Jacobi passes R', ylabel='loss (nats/token)', title='loss')
    left.legend()
    for key, label in (('change', '||z(r) - z(r-1)|| / ||z(r)||'), ('distance_to_exact', '||z(r) - z*|| / ||z*||')):
        points = [(r['passes'], r[key]) for r in jacobi if r.get(key)]  # zeros have no place on a log axis
        if points:
            right.semilogy(*zip(*points), 'o-', label=label)
    right.set(xlabel='Jacobi passes r', title='thoughts: change per pass, distance to exact')
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    with write_result(path) as f:
        fig.savefig(f, format='png', dpi=100)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# downstream tasks: lm-evaluation-harness

def lm_eval_class():
    """The lm-eval model class, nanoponder.lm_eval_adapter.NanoPonderLM (registered as 'nanoponder'), imported on
    first use so that lm-eval is needed only for downstream tasks."""
    try:
        from nanoponder.lm_eval_adapter import NanoPonderLM
    except ImportError as e:
        if (e.name or '').partition('.')[0] in ('model', 'nanoponder'):  # a name of this project: a bug, not lm-eval
            raise
        raise UserError("downstream tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'") from None
    return NanoPonderLM


def run_tasks(model, tok, device_name, dtype_name, path, name):
    """Downstream mode: the tasks through lm-eval; a markdown table on stdout, PATH_tasks.json."""
    cls = lm_eval_class()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
    lm = cls(model=model, tokenizer=tok, thoughts=thoughts, n_jacobi=n_jacobi, jacobi_tol=jacobi_tol,
             batch_size=batch_size, max_gen_toks=max_gen_toks, device=device_name, dtype=dtype_name)
    task_names = [t.strip() for t in tasks.split(',') if t.strip()]
    manager = task_manager(TaskManager, task_names)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=task_names, num_fewshot=num_fewshot, limit=limit or None,
                                          task_manager=manager, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:  # datasets could not fetch a task's data (offline, or the network is down)
        raise failure(f"could not get the data of {', '.join(task_names)}: {one_line(e)}. lm-eval downloads task "
                      f"datasets from the Hugging Face Hub: run once with network access (they are cached, and "
                      f"offline runs, HF_DATASETS_OFFLINE=1, read the cache), or give tasks over local files in "
                      f"--task_dir") from None
    table = make_table(results)
    print(f"{name}, {model.config.method_label}, thoughts: {describe_scoring(model)}, {num_fewshot}-shot")
    print(table)
    report = {'model': name, 'method': model.config.method, 'scoring': describe_scoring(model),
              'num_fewshot': num_fewshot, 'limit': limit or None, 'results': results.get('results'),
              'versions': results.get('versions'), 'n-shot': results.get('n-shot'),
              'n-samples': results.get('n-samples')}
    write_json(path + '_tasks.json', report)
    print(f"wrote {path}_tasks.json", file=sys.stderr)


def task_manager(TaskManager, task_names):
    """lm-eval's index of the tasks: task_dir's alone when it has them all (indexing lm-eval's own thousands of
    task files takes a while), else lm-eval's with task_dir's added. Unknown names are a UserError."""
    if task_dir:
        own = TaskManager(include_path=task_dir, include_defaults=False)
        if all(t in own.all_tasks for t in task_names):
            return own
    manager = TaskManager(include_path=task_dir or None)
    unknown = [t for t in task_names if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval --tasks list shows them; a folder "
                        f"of your own YAMLs goes in --task_dir)")
    return manager


def describe_scoring(model):
    if not model.config.n_thoughts:
        return 'none (no thoughts)'
    if thoughts == 'exact':
        return 'exact (sequential, KV cache)'
    if jacobi_tol is not None:
        return f'jacobi, adaptive to tol {jacobi_tol:g}'
    return f'jacobi, {model.config.n_jacobi if n_jacobi is None else n_jacobi} passes'


# -----------------------------------------------------------------------------
# the loss mode

def load_text(model, tok, ckpt):
    """-> (ids, the tokenizer that decodes them, a description) from --text, --data_dir or a checkpoint's data."""
    if text:
        return text_stream(text, tok), tok, f"{text} ({model_tokenizer_name(tok)} tokenizer)"
    directory = data_dir
    if not directory:
        if ckpt is None:
            raise UserError("what text? pass --data_dir=DIR (prepare_data.py) or --text=FILE")
        directory = checkpoint_data_dir(ckpt)
    ids, data_tok = data_stream(directory, split)
    mismatch = ckpt is not None and tokenizer_mismatch(ckpt, directory, read_meta(directory))
    if mismatch:
        raise UserError(f"{mismatch}: the model would be scored on ids that mean other text; pass --data_dir=DIR "
                        f"(data prepared with the checkpoint's tokenizer) or --text=FILE")
    top = int(ids.max())
    if top >= model.config.vocab_size:
        raise UserError(f"{directory}/{split}.bin holds id {top}, beyond the model's vocabulary of "
                        f"{model.config.vocab_size}: it was prepared with another tokenizer")
    return ids, data_tok, f"{directory} {split}"


def model_tokenizer_name(tok):
    return os.path.basename(str(tok.name))


def check_options():
    for key, lowest in (('block_size', 0), ('stride', 0), ('batch_size', 1), ('max_windows', 0), ('max_jacobi', 0),
                        ('num_fewshot', 0), ('limit', 0), ('max_gen_toks', 1)):
        if globals()[key] < lowest:
            raise UserError(f"{key} must be >= {lowest}, got {globals()[key]}")
    if task_dir and not os.path.isdir(task_dir):
        raise UserError(f"task_dir {task_dir!r} is not a directory: it names a folder of lm-eval task YAMLs")
    check_thought_mode(thoughts)
    for key, value in (('n_jacobi', n_jacobi), ('jacobi_tol', jacobi_tol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UserError(f"{key} must be a number >= 0 (or None), got {value!r}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in jacobi_tols):
        raise UserError(f"jacobi_tols must be numbers >= 0, e.g. (1e-2,1e-3), got {jacobi_tols!r}")
    if split not in ('train', 'val', 'test'):
        raise UserError(f"split must be train, val or test, got {split!r}")
    if text and data_dir:
        raise UserError("pass --text or --data_dir, not both")


def run_loss(model, tok, ckpt, device_name, compute_dtype, path, name):
    """The loss mode: the table on stdout, PATH.json and (thought models) PATH_jacobi.png; returns the report."""
    ctx = autocast(torch.device(device_name).type, compute_dtype)
    if compute_dtype == torch.float32:  # full float32: the TF32 matmuls that autocast turns on would floor the
        torch.backends.cuda.matmul.allow_tf32 = False  # convergence figures
        torch.backends.cudnn.allow_tf32 = False
    ids, data_tok, source = load_text(model, tok, ckpt)
    cfg = model.config
    block = block_size or cfg.block_size
    if block > cfg.block_size:
        raise UserError(f"block_size={block} is longer than the model's context ({cfg.block_size})")
    step = stride or block
    if step > block:
        raise UserError(f"stride={step} is longer than block_size={block}: tokens between windows would go unscored")
    windows = sliding_windows(len(ids), block, step)
    if max_windows:
        windows = windows[:max_windows]
    n_targets = windows[-1][1] - 1
    n_bytes = utf8_bytes(data_tok, ids[1:windows[-1][1]])
    tols = tuple(float(t) for t in jacobi_tols) if cfg.n_thoughts else ()
    max_r = max_jacobi if cfg.n_thoughts else 0
    totals = evaluate_loss(model, ids, windows, ctx, device_name, batch_size, max_r, tols,
                           exact and cfg.n_thoughts > 0)
    rows = loss_rows(totals, n_targets, n_bytes, max_r, tols)
    kv = kv_cache_bytes_per_token(cfg, torch.finfo(compute_dtype).bits // 8)
    print(f"{name}: {cfg.method_label}; {source}: {n_targets:,} tokens ({n_bytes:,} bytes) in {len(windows)} "
          f"windows of {block}, stride {step}")
    print(f"KV cache: {kv:,} bytes per token in {str(compute_dtype).removeprefix('torch.')} "
          f"({kv_cache_slots(cfg)}x vanilla)")
    print(loss_table(rows))
    report = {'model': name, 'method': cfg.method, 'config': {k: v for k, v in vars(cfg).items()},
              'data': source, 'block_size': block, 'stride': step, 'windows': len(windows), 'tokens': n_targets,
              'bytes': n_bytes, 'kv_cache_bytes_per_token': kv, 'dtype': str(compute_dtype).removeprefix('torch.'),
              'rows': rows}
    write_json(path + '.json', report)
    written = [path + '.json']
    if cfg.n_thoughts:
        try:
            plotted = plot_jacobi(rows, path + '_jacobi.png', f"{name}: {cfg.method_label}, {source}")
        except UserError as e:  # the JSON is written: say so, and that a plot left in place is an older one's
            raise UserError(f"{e} (an earlier evaluation's plot, if any); the new results are in {path}.json",
                            e.exit_code) from None
        if plotted:
            written.append(plotted)
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return report


def main():
    check_options()
    kind, source = resolve_init_from(init_from, out_dir)  # (load_model reads it by the same rule)
    ckpt_file = source if kind == 'checkpoint' else None
    path = results_path(init_from, ckpt_file, out)
    check_output_file(path + ('_tasks.json' if tasks else '.json'), '--out')  # now, not after the evaluation
    device_name = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, torch.device(device_name).type)
    torch.manual_seed(seed)
    model, tok, ckpt = load_model(init_from, out_dir, tokenizer, patch_method)
    name = ckpt_file or init_from
    if tasks:
        return run_tasks(model, tok, device_name, dtype, path, name)
    model.to(device_name).eval()
    run_loss(model, tok, ckpt, device_name, compute_dtype, path, name)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
