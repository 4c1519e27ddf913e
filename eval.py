"""
Evaluate a model the way the PonderLM papers report it (docs/evaluation.md):

- loss, perplexity and bits per byte of held-out text (a prepared split or a raw text file), every token scored
  once, in sliding windows (--stride) where the text is longer than the context;
- for a PonderLM-2 model, the loss after R = 0..max_jacobi Jacobi passes (the parallel form training runs), adaptive
  Jacobi to each of jacobi_tols, and exact thoughts (one token at a time through the KV cache, as decoding runs),
  with how much the thoughts still move per pass and their distance to the exact ones. A markdown table on
  stdout, PATH.json and a plot PATH_jacobi.png;
- with --lens=True, every pass of every method read through the LM head, per token (nanoponder/lens.py): per pass
  the NLL, top-1 accuracy and KL from the last pass, the tokens the passes fix and break, the NLL gain by the
  target's frequency; a table, PATH.json's 'lens' and a picture PATH_lens.png;
- downstream tasks through lm-evaluation-harness (pip install lm-eval): a markdown table and PATH_tasks.json.

    python eval.py --init_from=out-shakespeare-ponder/ckpt.pt           # the val split of its training data
    python eval.py --init_from=out/ckpt.pt --data_dir=data/minipile --split=test --max_windows=500
    python eval.py --out_dir=out-shakespeare-ponder --split=test --lens=True   # what each pass predicts
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-410m --text=wiki.test.raw --block_size=2048 --stride=1024
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --tasks=lambada_openai,arc_easy --num_fewshot=0
    python eval.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --tasks=piqa --thoughts=jacobi --n_jacobi=3
    python eval.py --init_from=path/to/hf_dir --tasks=my_task --task_dir=path/to/task_yamls --limit=100

The tokenizer is the model's own (see sample.py). Downstream tasks score with exact thoughts by default (what
decoding sees); --thoughts=jacobi with n_jacobi passes, as the papers do. Results go to --out=PATH, checked to be
writable before the evaluation starts. The default dtype is float32 with TF32 off: the convergence figures are
not floored by the dtype's rounding.
"""
import importlib
import math
import os
import sys
import torch
from tqdm import tqdm

from model import pass_states, settled
from nanoponder import kernels
from nanoponder.checkpoint import load_init_from, resolve_init_from
from nanoponder.cost import kv_cache_bytes_per_token, kv_cache_slots
from nanoponder.batches import (data_stream, nats, sliding_windows, text_stream, utf8_bytes, window_batches,
                                window_counts)
from nanoponder.data import read_meta
from nanoponder.adaptive import adaptive_table, score_thresholds
from nanoponder.lens import LensTotals, lens_table, plot_lens, target_buckets
from nanoponder.methods import check_thought_mode
from nanoponder.report import loss_table, plot_jacobi
from nanoponder.runtime import (NUMPY_SEEDS, TORCH_SEEDS, UserError, autocast, check_output_file, check_seed,
                                resolve_device, resolve_dtype, run_cli, write_json)
from nanoponder.tokenizer import checkpoint_data_dir, model_tokenizer, safe_decode, tokenizer_mismatch

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
lens = False            # also every pass's readout through the head (exact thoughts; --thoughts=jacobi: n_jacobi)
think_thresholds = ()   # PonderLM-2: the loss of adaptive thoughts at each, e.g. (1,0.9,0.6,0); --tasks: one, (0.9,)
# downstream tasks (lm-evaluation-harness)
tasks = ''              # comma-separated task names: switches to downstream mode
num_fewshot = 0         # examples shown before each task question
limit = 0               # examples per task; 0 = all
task_dir = ''           # a folder of extra task YAMLs (lm-eval's include_path)
thoughts = 'exact'      # tasks and the lens: exact (what decoding sees) | jacobi (parallel passes, as the papers)
n_jacobi = None         # with thoughts=jacobi: the passes; None = the model's own n_jacobi
jacobi_tol = None       # with thoughts=jacobi: adaptive passes to this tolerance instead of n_jacobi
max_gen_toks = 256      # generate_until: tokens at most, unless a task says otherwise
# output and system
out = ''                # results path without extension (a directory: DIR/eval); '' = eval beside a ckpt.pt, else
                        # eval-<model name> (eval_test, eval_test-<model name> with split=test)
device = 'auto'         # auto | cpu | cuda | cuda:1 | mps
dtype = 'float32'       # float32 | bfloat16 | float16 | auto (nanoponder.runtime.resolve_dtype); see above
seed = 1337             # of lm-eval's few-shot draws and of any sampling
# -----------------------------------------------------------------------------
_config_echo = 'stderr'  # configurator.py echoes the keys set on stderr: stdout is the results table



# -----------------------------------------------------------------------------
# the model

def results_path(init_from, ckpt_file, out, split='val'):
    """Where results go, without extension; ckpt_file: the train.py checkpoint init_from names, or None. The
    default names are eval (the val split) and eval_<split> (another), so that a test split's never replaces val's."""
    name = 'eval' if split == 'val' else f'eval_{split}'
    if out.endswith(('/', os.sep)) or os.path.isdir(out):  # a directory gets DIR/eval.json, not a hidden DIR/.json
        return os.path.join(out, name)
    if out:
        return out.removesuffix('.json')  # --out=x.json writes x.json, not x.json.json
    if ckpt_file is not None:
        return os.path.join(os.path.dirname(os.path.abspath(ckpt_file)), name)
    return f'{name}-' + os.path.basename(os.path.normpath(init_from))


# -----------------------------------------------------------------------------
# the text: one stream of token ids, windows over it, and its bytes

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
    stop predicate; and adaptive Jacobi to each tolerance (settled), with the passes it took. Returns the exact
    pass states (B, T, K+1, C) (with_exact) or None."""
    z_exact = None
    if with_exact:
        caches = model.new_caches(x.size(0), x.size(1), x.device)
        h_exact, z_exact = model.sequential(x, caches)  # (B, T, C), (B, T, K, C)
        totals.add('exact', nats(model.embed_out(h_exact), y))
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
    return torch.cat((z_exact, h_exact[:, :, None]), dim=2) if with_exact else None


def evaluate_loss(model, ids, windows, ctx, device, batch_sz, max_r, tols, with_exact, lens_totals=None,
                  lens_jacobi=None):
    """Score every window; returns the Totals. lens_totals: also each pass's readout (the exact thoughts' states
    are the ones scored above, lens_jacobi passes else)."""
    totals = Totals(max_r)
    n_batches = sum(math.ceil(n / batch_sz) for n in window_counts(windows).values())
    with torch.no_grad(), ctx:
        for x, y in tqdm(window_batches(ids, windows, batch_sz, device), total=n_batches, desc='scoring',
                         unit='batch', file=sys.stderr, dynamic_ncols=True):
            states = None
            if model.config.n_thoughts:
                states = score_thought_batch(model, x, y, totals, max_r, tols, with_exact)
            else:
                totals.add(model.config.method_label, nats(model(x)[0], y))
            if lens_totals is not None:
                if states is None or lens_jacobi is not None:
                    states = pass_states(model, x, lens_jacobi)
                lens_totals.add(model.embed_out, states, y)
    return totals


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


# -----------------------------------------------------------------------------
# downstream tasks: lm-evaluation-harness

def lm_eval_adapter():
    """nanoponder.lm_eval_adapter (its NanoPonderLM is lm-eval's model 'nanoponder'), imported on first use: lm-eval
    is needed only for downstream tasks."""
    try:
        return importlib.import_module('nanoponder.lm_eval_adapter')
    except ImportError as e:
        if (e.name or '').partition('.')[0] in ('model', 'nanoponder'):  # a name of this project: a bug, not lm-eval
            raise
        raise UserError("downstream tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'") from None


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
    if tokenizer:
        print(f"note: --tokenizer is not used on a prepared split: {directory}'s ids and bytes are its own "
              f"tokenizer's", file=sys.stderr)
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
    if n_jacobi is not None and (isinstance(n_jacobi, bool) or not isinstance(n_jacobi, int) or n_jacobi < 0):
        raise UserError(f"n_jacobi must be a whole number >= 0 (or None), got {n_jacobi!r}")
    if jacobi_tol is not None and (isinstance(jacobi_tol, bool) or not isinstance(jacobi_tol, (int, float))
                                   or not jacobi_tol >= 0):
        raise UserError(f"jacobi_tol must be a number >= 0 (or None), got {jacobi_tol!r}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in jacobi_tols):
        raise UserError(f"jacobi_tols must be numbers >= 0, e.g. (1e-2,1e-3), got {jacobi_tols!r}")
    if split not in ('train', 'val', 'test'):
        raise UserError(f"split must be train, val or test, got {split!r}")
    if text and data_dir:
        raise UserError("pass --text or --data_dir, not both")
    if tasks and not [t for t in tasks.split(',') if t.strip()]:
        raise UserError(f"tasks={tasks!r} names no task: pass --tasks=name[,name...] (lm-eval --tasks list)")
    check_seed(seed, seeds=NUMPY_SEEDS if tasks else TORCH_SEEDS)
    if lens not in (True, False):
        raise UserError(f"lens must be True or False, got {lens!r}")
    if not all(type(t) in (int, float) and 0 <= t <= 1 for t in think_thresholds):
        raise UserError(f"think_thresholds must be numbers in [0, 1], e.g. (1,0.9,0.6,0), got {think_thresholds!r}")
    if tasks and (lens or len(think_thresholds) > 1):
        raise UserError("--lens and a sweep of --think_thresholds read a text's loss (the loss mode): drop --tasks, "
                        "or them (--tasks takes one threshold, e.g. --think_thresholds=(0.9,))")
    if tasks and think_thresholds and think_thresholds[0] < 1 and thoughts != 'exact':
        raise UserError("--think_thresholds stops thoughts token by token, as decoding does; --thoughts=jacobi "
                        "cannot: drop one")
    if not tasks and (jacobi_tol is not None or (thoughts == 'exact' or not lens) and n_jacobi is not None
                      or not lens and thoughts != 'exact'):
        print("note: thoughts, n_jacobi and jacobi_tol choose how --tasks scores (and --thoughts=jacobi with n_jacobi "
              "the lens); the loss mode reports every way (max_jacobi, jacobi_tols, exact)", file=sys.stderr)


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
    max_r = min(max_jacobi, cfg.n_thoughts * (block - 1))  # (no thoughts: 0) past K(T-1) passes all are exact
    if cfg.n_thoughts and max_r < max_jacobi:
        print(f"note: max_jacobi={max_jacobi} is past the K(T-1) = {max_r} passes after which every thought of a "
              f"{block}-token window is exact: rows up to R={max_r}", file=sys.stderr)
    lens_totals, lens_jacobi, lens_source = None, None, None
    if lens:
        bucket_of, labels, lens_source = target_buckets(model.config.vocab_size, ckpt, ids)
        lens_totals = LensTotals(cfg, bucket_of, labels)
        if len(lens_totals.names) == 1:
            print(f"note: a {cfg.method_label} model reads each token once: the lens has one pass, nothing to "
                  f"compare it with", file=sys.stderr)
        if cfg.n_thoughts and thoughts == 'jacobi':
            lens_jacobi = cfg.n_jacobi if n_jacobi is None else n_jacobi
        elif thoughts == 'jacobi':
            print(f"note: --thoughts=jacobi: a {cfg.method_label} model has no thoughts, its lens reads its passes as "
                  f"they are", file=sys.stderr)
    totals = evaluate_loss(model, ids, windows, ctx, device_name, batch_size, max_r, tols,
                           cfg.n_thoughts > 0 and (exact or lens and lens_jacobi is None), lens_totals, lens_jacobi)
    rows = loss_rows(totals, n_targets, n_bytes, max_r, tols)
    adaptive = []
    if think_thresholds and cfg.n_thoughts:  # decoding's adaptive rule, token by token through the cache
        with ctx:
            adaptive = score_thresholds(model, lambda: window_batches(ids, windows, batch_size, device_name),
                                        think_thresholds)
    kv = kv_cache_bytes_per_token(cfg, torch.finfo(compute_dtype).bits // 8)
    print(f"{name}: {cfg.method_label}; {source}: {n_targets:,} tokens ({n_bytes:,} bytes) in {len(windows)} "
          f"windows of {block}, stride {step}")
    print(f"KV cache: {kv:,} bytes per token in {str(compute_dtype).removeprefix('torch.')} "
          f"({kv_cache_slots(cfg)}x vanilla)")
    print(loss_table(rows))
    if adaptive:
        print(adaptive_table(adaptive))
    report = {'model': name, 'method': cfg.method, 'config': {k: v for k, v in vars(cfg).items()},
              'data': source, 'block_size': block, 'stride': step, 'windows': len(windows), 'tokens': n_targets,
              'bytes': n_bytes, 'kv_cache_bytes_per_token': kv, 'dtype': str(compute_dtype).removeprefix('torch.'),
              'rows': rows, **({'adaptive': adaptive} if adaptive else {})}
    if lens_totals is not None:
        what = ('exact thoughts' if lens_jacobi is None else f'Jacobi thoughts, R={lens_jacobi}') if cfg.n_thoughts \
            else cfg.method_label
        report['lens'] = lens_totals.report(what, lens_source)
        print(lens_table(report['lens']))
    write_json(path + '.json', report)
    written = [path + '.json']
    if lens_totals is not None:
        plotted = plot_lens(report['lens'], lambda i: safe_decode(data_tok, i), path + '_lens.png',
                            f"{name}: {cfg.method_label}, {source}")
        if plotted:
            written.append(plotted)
    if cfg.n_thoughts and max_r > 0:  # (no plot of a single pass)
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
    kind, source = resolve_init_from(init_from, out_dir)  # (load_init_from reads it by the same rule)
    ckpt_file = source if kind == 'checkpoint' else None
    path = results_path(init_from, ckpt_file, out, split if not tasks else 'val')
    check_output_file(path + ('_tasks.json' if tasks else '.json'), '--out')  # now, not after the evaluation
    device_name = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, torch.device(device_name).type)
    torch.manual_seed(seed)
    model, ckpt, source = load_init_from(init_from, out_dir, patch_method=patch_method)
    tok = model_tokenizer(source, ckpt, tokenizer, model.config.vocab_size)
    name = ckpt_file or init_from
    kernels.install(model)  # faster attention and loss where they suit (nanoponder/kernels.py)
    if think_thresholds and not model.config.n_thoughts:
        print(f"note: think_thresholds: a {model.config.method_label} model has no thoughts to skip", file=sys.stderr)
    if tasks:
        return lm_eval_adapter().run_tasks(
            model, tok, name, path, [t.strip() for t in tasks.split(',') if t.strip()], num_fewshot, limit, task_dir,
            seed, thoughts=thoughts, n_jacobi=n_jacobi, jacobi_tol=jacobi_tol, batch_size=batch_size,
            max_gen_toks=max_gen_toks, device=device_name, dtype=dtype,
            think_threshold=think_thresholds[0] if think_thresholds else None)
    model.to(device_name).eval()
    run_loss(model, tok, ckpt, device_name, compute_dtype, path, name)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
