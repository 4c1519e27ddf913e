"""
What a training run checks and builds before its first iteration, from its config cfg (the training config's keys
as attributes): every config value, the out_dir (no run to overwrite, a lock while training), the data, and the
model (from scratch, resumed from out_dir/ckpt.pt, or from a Hugging Face model) with every check of it against the
config and the data. Each mistake is one UserError, raised before anything the user had is touched.

    from nanoponder.prerun import check_config, training_session, open_data, build_model
"""
import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch

from model import GPT, METHOD_COUNTS, GPTConfig
from nanoponder.checkpoint import load_init_from, resolve_init_from
from nanoponder.batches import TrainBatches, ValBatches, open_blocks
from nanoponder.data import default_data_dir, default_named, max_token_id
from nanoponder.parallel import PARALLELISMS, all_ranks_agree, teardown_distributed
from nanoponder.runtime import (TEMP_SUFFIX, DirectoryLock, UserError, failure, one_line, remove_stale_temp_files,
                                resolve_device, resolve_dtype)
from nanoponder.tokenizer import tokenizer_mismatch, tokenizer_record

MAX_ITERS = 10 ** 12  # more than any run does (30 years at 1,000 iterations a second); beyond it, a typo
# the data order and the Jacobi passes R seed a generator with seed * 1_000_003 + epoch or iteration: an int64
MAX_SEED = (2 ** 63 - 1 - MAX_ITERS) // 1_000_003


# -----------------------------------------------------------------------------
# the config

def check_config(cfg):
    """Every config value that can be wrong, checked up front: one UserError naming the key and its range."""
    for name, value in vars(cfg).items():  # inf (--weight_decay=1e999) or nan would only surface as a divergence
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    for name in ('batch_size', 'gradient_accumulation_steps', 'block_size', 'eval_interval', 'eval_iters',
                 'log_interval', 'vocab_size'):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'n_layer', 'n_head', 'n_embd', 'num_epochs',
                 'grad_clip', 'weight_decay'):
        if not getattr(cfg, name) >= 0:  # `not >=` also catches nan
            raise UserError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ('warmup_ratio', 'min_lr_ratio'):  # shares: of the run, of the peak learning rate
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.max_iters == 0 and cfg.num_epochs == 0:
        raise UserError("max_iters and num_epochs are both 0: set one of them")
    if cfg.max_iters > MAX_ITERS:
        raise UserError(f"max_iters must be <= {MAX_ITERS:.0e} (30 years at 1,000 iterations a second), "
                        f"got {cfg.max_iters:.3g}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"seed must be in [0, {MAX_SEED:,}] (seed * 1_000_003 + iteration seeds the data order and "
                        f"the Jacobi passes, and must fit in 63 bits), got {cfg.seed}")
    if not 0 < cfg.learning_rate < math.inf:
        raise UserError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    for name in ('beta1', 'beta2'):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.eps < 1:
        raise UserError(f"eps must be in (0, 1), got {cfg.eps}")
    r = tuple(cfg.jacobi_train_range)
    if not (len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r) and 0 <= r[0] <= r[1]):
        raise UserError(f"jacobi_train_range must be (lo, hi), two whole numbers with 0 <= lo <= hi, "
                        f"got {cfg.jacobi_train_range!r}")
    if cfg.init_from not in ('scratch', 'resume') and (str(cfg.embed_scale_rule) != 'official'
                                                       or cfg.init_shrink_passes):
        raise UserError(f"embed_scale_rule and init_shrink_passes set up a new model's embeddings and init; "
                        f"{cfg.init_from}'s weights were trained with their own: drop them")
    G = cfg.jacobi_grad_passes
    if isinstance(G, bool) or not isinstance(G, int) or G < 0:
        raise UserError(f"jacobi_grad_passes must be a whole number >= 0 (0: every pass builds a graph; G: the last "
                        f"G passes), got {G!r}")
    if G and not cfg.n_thoughts and cfg.init_from == 'scratch':
        raise UserError(f"jacobi_grad_passes={G} truncates PonderLM-2's Jacobi passes, and n_thoughts is 0: set "
                        f"--n_thoughts=K, or drop jacobi_grad_passes")
    if not (isinstance(cfg.thought_dropout, (int, float)) and 0 <= cfg.thought_dropout < 1):  # (nan fails too)
        raise UserError(f"thought_dropout must be a probability in [0, 1) (0: every token thinks), got "
                        f"{cfg.thought_dropout!r}")
    if not cfg.out_dir.strip():
        raise UserError("out_dir is empty: name a directory for the checkpoints, e.g. --out_dir=out")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir {cfg.out_dir!r} is a file, not a directory: choose another --out_dir")
    if os.path.realpath(cfg.out_dir) == os.path.realpath(cfg.data_dir):  # prepare_data.py --overwrite would mix them
        raise UserError(f"out_dir is the data_dir ({cfg.data_dir}): a run's files go in a directory of their own; "
                        f"choose another --out_dir")
    if cfg.dataset not in DATASETS:
        raise UserError(f"dataset must be one of {', '.join(DATASETS[1:])} (how a missing data_dir is prepared) or '' "
                        f"(none), got {cfg.dataset!r}")
    if cfg.ponder_multiply and not cfg.n_ponder:  # (a Hidden run took it silently)
        raise UserError("ponder_multiply=True multiplies PonderLM's first input embeddings, and n_ponder is 0: set "
                        "n_ponder, or leave ponder_multiply out")
    if cfg.parallelism not in PARALLELISMS:
        raise UserError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {cfg.parallelism!r}")
    device_type = resolve_device(cfg.device).split(':')[0]
    if resolve_dtype(cfg.dtype, device_type) == torch.float16 and cfg.parallelism == 'fsdp':
        raise UserError("dtype='float16' with parallelism='fsdp' is not supported (its loss scaling would need "
                        "every shard's overflow check): use --dtype=bfloat16")


def schedule(cfg, iters_per_epoch):
    """-> (total_iters, warmup, decay_end): the run's length and its learning-rate schedule, in iterations."""
    total_iters = cfg.max_iters or max(1, round(cfg.num_epochs * iters_per_epoch))
    if total_iters > MAX_ITERS:
        raise UserError(f"num_epochs={cfg.num_epochs:g} is {total_iters:.3g} iterations of this data, more than "
                        f"{MAX_ITERS:.0e} (30 years at 1,000 iterations a second): lower num_epochs")
    return total_iters, cfg.warmup_iters or round(cfg.warmup_ratio * total_iters), cfg.lr_decay_iters or total_iters


# -----------------------------------------------------------------------------
# the out_dir: one run's

# what a run writes into its out_dir, and the results eval.py writes beside its checkpoint by default
RUN_FILES = ('ckpt.pt', 'best.pt', 'metrics.jsonl', 'loss.png', 'eval_tasks.json') + tuple(
    name + ending for name in ('eval', 'eval_test') for ending in ('.json', '_jacobi.png', '_lens.png'))


@contextmanager
def training_session(cfg, master, distributed):
    """The run inside the `with` owns out_dir: rank 0 claims it (no run to overwrite there, no other run in it: the
    lock; no stale temp files), and every rank stops if rank 0 cannot. Whatever happens inside, on the way out the
    lock is released (a command that failed its checks leaves no empty out_dir), the process group is left, and
    running out of GPU memory is one line."""
    made_out_dir = master and not os.path.exists(cfg.out_dir)
    lock, finished = None, False
    try:
        lock = claim_out_dir(cfg, master, distributed)
        yield
        finished = True
    except torch.OutOfMemoryError:
        raise failure(f"out of GPU memory with batch_size={cfg.batch_size}: lower it and raise "
                      f"gradient_accumulation_steps by the same factor (same global batch)") from None
    finally:
        if lock:
            lock.release()
            if made_out_dir and not os.listdir(cfg.out_dir):
                os.rmdir(cfg.out_dir)
        if distributed:
            teardown_distributed(finished)


def claim_out_dir(cfg, master, distributed):
    """Rank 0 checks that out_dir holds no run to overwrite, takes its lock and removes stale temp files. Returns
    the lock (None on other ranks)."""
    lock, problem = None, None
    if master:
        try:
            check_out_dir_is_free(cfg)
            os.makedirs(cfg.out_dir, exist_ok=True)
            lock = DirectoryLock(cfg.out_dir)
            lock.acquire()
            for name in remove_stale_temp_files(cfg.out_dir):
                print(f"note: removed {os.path.join(cfg.out_dir, name)}, left by a save that was killed")
        except (UserError, OSError) as e:
            problem = e
    if not all_ranks_agree(problem is None, distributed):
        if isinstance(problem, OSError):
            raise UserError(f"cannot use out_dir {cfg.out_dir!r}: {one_line(problem)}")
        raise problem or UserError("rank 0 could not claim out_dir")  # other ranks: rank 0 says why
    return lock


def check_out_dir_is_free(cfg):
    """A new run (scratch or from a Hugging Face model) must not silently replace a run already in out_dir: its
    ckpt.pt, or a best.pt alone (a run whose ckpt.pt was moved away still has its best model here)."""
    held = [p for p in (os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'best.pt')) if os.path.exists(p)]
    if cfg.init_from != 'resume' and held and not cfg.overwrite:
        how = "continue it with --init_from=resume, " if held[0].endswith('ckpt.pt') else ''
        raise UserError(f"{cfg.out_dir} already holds a run ({held[0]}): {how}choose another --out_dir, or pass "
                        f"--overwrite=True to start over in it")


def remove_previous_run(cfg):
    """--overwrite=True starts over: all of the old run's files go, not only the ckpt.pt that the first save
    replaces (a stop before the first new best would leave the old best.pt beside the new run). -> notes."""
    removed = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, name))]
    for name in removed:
        os.remove(os.path.join(cfg.out_dir, name))
    return [f"note: --overwrite=True: removed the previous run's {', '.join(removed)} from {cfg.out_dir}"] \
        if removed else []


# -----------------------------------------------------------------------------
# the data

DATASETS = ('', 'minipile', 'shakespeare', 'text')  # prepare_data.py's; '' = the config names none


def data_to_prepare(cfg, distributed):
    """The note to print if data_dir is missing and to be prepared now with the config's dataset, tokenizer and
    input, else '': Tiny Shakespeare and a local text are, MiniPile (GBs to download) only with prepare=True. A
    missing data_dir that is not, any under torchrun (every rank would wait for one), a directory that holds other
    files, and one named for another dataset are one UserError naming what to do."""
    if not cfg.dataset or os.path.isfile(cfg.data_dir) or os.path.exists(os.path.join(cfg.data_dir, 'meta.json')):
        return ''
    command = ' '.join(['python prepare_data.py', f'--dataset={cfg.dataset}', f'--tokenizer={cfg.tokenizer}',
                        f'--out_dir={cfg.data_dir}'] + ([f'--input={cfg.input}'] if cfg.input else []))
    named, wanted = default_named(cfg.data_dir), default_data_dir(cfg.dataset, cfg.tokenizer)
    if named and os.path.normpath(cfg.data_dir) != wanted:  # a name that would mislead every later run
        raise UserError(f"data_dir {cfg.data_dir} is where prepare_data.py puts {named[0]} data"
                        f"{f' with tokenizer {named[1]}' if named[1] else ''}, not {cfg.dataset} with tokenizer "
                        f"{cfg.tokenizer}: pass --data_dir={wanted}")
    others = [n for n in (os.listdir(cfg.data_dir) if os.path.isdir(cfg.data_dir) else []) if not TEMP_SUFFIX.search(n)]
    if others:
        raise UserError(f"data_dir {cfg.data_dir} holds {', '.join(sorted(others)[:3])}{', ...' if others[3:] else ''} "
                        f"but no meta.json: it is no prepared data directory (or a preparation that did not finish); "
                        f"pass another --data_dir, or prepare it with `{command} --overwrite=True`")
    if distributed:
        raise UserError(f"data_dir {cfg.data_dir} is not prepared: run `{command}` first (under torchrun no rank "
                        f"prepares it: the others would wait for it)")
    if cfg.dataset == 'minipile' and not cfg.prepare:
        raise UserError(f"data_dir {cfg.data_dir} is not prepared: MiniPile is GBs to download and an hour of "
                        f"tokenizing, which train.py does not start unasked; run `{command}`, or pass --prepare=True")
    if cfg.dataset == 'text' and not cfg.input:
        raise UserError(f"data_dir {cfg.data_dir} is not prepared, and dataset='text' is prepared from your own "
                        f"text: pass --input=PATH (a .txt file, a directory or a glob)")
    if cfg.init_from != 'scratch':  # a missing checkpoint is found now, not after the preparation
        resolve_init_from(cfg.init_from, cfg.out_dir)
    return f"note: data_dir {cfg.data_dir} is missing: preparing it first, as `{command}` would"


def other_data_notes(cfg, meta):
    """A note if data_dir's meta.json names another dataset than the config, or a tokenizer known to differ (by
    name, or a tokenizer.json by its sha256): dataset and tokenizer say how a missing data_dir is prepared, and a
    prepared one is used as it is."""
    if not cfg.dataset:
        return []
    tok, theirs = cfg.tokenizer, str(meta.get('tokenizer'))
    if os.path.isfile(tok):
        with open(tok, 'rb') as f:
            other_tok = hashlib.sha256(f.read()).hexdigest() != meta.get('tokenizer_sha256')
    else:  # pythia, gpt2, bpe:N: a tokenizer.json path in meta.json may be any of them
        other_tok = os.sep not in theirs and tok != theirs
    if meta.get('dataset') == cfg.dataset and not other_tok:
        return []
    return [f"note: data_dir {cfg.data_dir} holds {meta.get('dataset')} data with tokenizer {theirs}, not the config's "
            f"{cfg.dataset} with {tok}: it is used as it is (dataset and tokenizer say how a missing data_dir is "
            f"prepared; pass --data_dir=... for another)"]


def open_data(cfg, device, accum, rank, world_size):
    """-> (train batches, val batches, meta.json) of cfg.data_dir, cut into blocks of block_size."""
    train_blocks, val_blocks, meta = open_blocks(cfg.data_dir, cfg.block_size, device)
    train_batches = TrainBatches(train_blocks, cfg.batch_size, accum, rank, world_size, cfg.seed)
    if train_batches.iters_per_epoch == 0:
        raise UserError(f"the batch is larger than the data: one iteration reads {train_batches.blocks_per_iter} "
                        f"blocks of {cfg.block_size + 1} tokens (batch_size x gradient_accumulation_steps) but "
                        f"{train_blocks.path} holds {train_blocks.n_blocks}: lower batch_size, "
                        f"gradient_accumulation_steps or block_size")
    return train_batches, ValBatches(val_blocks, cfg.batch_size, rank, world_size), meta


def check_token_ids(blocks, model_vocab, data_dir, meta):
    """Every id in the token files must be below the model's vocab_size: token files that do not match their
    meta.json would fail at the batch that holds such an id (an IndexError; on CUDA a device assert), maybe hours
    in."""
    for b in blocks:
        top = max_token_id(b.path)
        if top >= model_vocab:
            raise UserError(f"{b.path} holds token id {top}, but the model's vocab_size is {model_vocab} (and "
                            f"{data_dir}/meta.json says {meta['vocab_size']}): the token files do not match their "
                            f"meta.json; prepare the data again with prepare_data.py")


# -----------------------------------------------------------------------------
# the model

def build_model(cfg, train_batches, val_batches, meta):
    """The model cfg.init_from asks for, on the CPU: from scratch, resumed from out_dir/ckpt.pt (its model must be
    the one cfg asks for, its data tokenized as cfg.data_dir) or from a Hugging Face model (the architecture from its
    config.json, the method and block_size from cfg). -> (model, Checkpoint or None, pretrained name or None,
    the data's tokenizer record that every checkpoint carries, notes for the log)."""
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    data_vocab = meta['vocab_size']
    ckpt, pretrained = None, None
    if cfg.init_from == 'resume':
        ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
        if not os.path.exists(ckpt_path):
            raise UserError(f"init_from=resume but there is no checkpoint {ckpt_path}: train once with "
                            f"--init_from=scratch --out_dir={cfg.out_dir} (it saves ckpt.pt at each evaluation)")
        model, ckpt, _ = load_init_from('resume', cfg.out_dir)
        check_pause_token(cfg, data_vocab, ckpt.gpt_config().vocab_size if ckpt.pretrained else cfg.vocab_size)
        check_resume_matches(ckpt, ckpt_path, cfg)
        pretrained = ckpt.pretrained
    elif cfg.init_from == 'scratch':
        check_pause_token(cfg, data_vocab, cfg.vocab_size)
        model = GPT(scratch_config(cfg))
    else:  # a Hugging Face model, by the rule of every script (checkpoint.resolve_init_from)
        choices = "'scratch', 'resume' (out_dir/ckpt.pt), a Hugging Face model directory or a hub id (owner/name)"
        if resolve_init_from(cfg.init_from, cfg.out_dir, choices)[0] == 'checkpoint':
            raise UserError(f"init_from={cfg.init_from} is a file, taken for a train.py checkpoint: train.py starts "
                            f"from 'scratch' or a Hugging Face model, and goes on with a run by --init_from=resume "
                            f"(with the --out_dir that holds its ckpt.pt)")
        model, _, _ = load_init_from(cfg.init_from, cfg.out_dir, choices, **method_overrides(cfg))
        pretrained = cfg.init_from
        check_pause_token(cfg, data_vocab, model.config.vocab_size)  # (a row beyond it is refused on load)
    if cfg.jacobi_grad_passes and not model.config.n_thoughts:
        raise UserError(f"jacobi_grad_passes={cfg.jacobi_grad_passes} truncates PonderLM-2's Jacobi passes, and "
                        f"{cfg.init_from}'s model is {model.config.method_label}: drop jacobi_grad_passes")
    if model.config.vocab_size < data_vocab:
        raise UserError(f"the data's vocabulary ({data_vocab} ids, {cfg.data_dir}/meta.json) is larger than the "
                        f"model's vocab_size {model.config.vocab_size}: raise vocab_size")
    check_token_ids((train_batches.blocks, val_batches.blocks), model.config.vocab_size, cfg.data_dir, meta)
    tokenizer = tokenizer_record(cfg.data_dir, meta)
    notes = (resume_notes(ckpt.config or {}, cfg) if ckpt is not None else []) + other_data_notes(cfg, meta)
    if cfg.thought_dropout and not model.config.n_thoughts:
        notes.append(f"note: thought_dropout={cfg.thought_dropout:g}: a {model.config.method_label} model has no "
                     f"thoughts to skip; it trains as it would without")
    if tokenizer['json'] is None and tokenizer['name'] != 'gpt2':  # gpt2: its name is all
        notes.append(f"note: the tokenizer of {cfg.data_dir} cannot be loaded (meta.json's tokenizer: "
                     f"{tokenizer['name']}, no tokenizer.json), so the checkpoints carry none: sample.py, eval.py "
                     f"and export_hf.py will need --tokenizer=PATH")
    if ckpt is not None:
        mismatch = tokenizer_mismatch(ckpt, cfg.data_dir, meta)
        if mismatch:
            raise UserError(f"{mismatch}: resuming would train on ids that mean other text; resume on data "
                            f"prepared with the run's tokenizer, or start a new run in another out_dir")
    return model, ckpt, pretrained, tokenizer, notes


def scratch_config(cfg):
    """The GPTConfig that cfg asks for from scratch: a preset (cfg.model) or its shape keys, and the method."""
    shape = {}
    if cfg.model:
        try:
            base = GPTConfig.preset(cfg.model)
        except ValueError as e:
            raise UserError(f"{e}, or model='' with n_layer, n_head and n_embd") from None
        shape = {'n_layer': base.n_layer, 'n_head': base.n_head, 'n_embd': base.n_embd}
    for key in ('n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key):
            shape[key] = getattr(cfg, key)
        elif key not in shape:
            raise UserError(f"model='' needs --{key}=... (> 0), or name a preset such as --model=pythia-70m")
    return make_config(**shape, vocab_size=cfg.vocab_size, scale_embeds=cfg.scale_embeds,
                       embed_scale_rule=str(cfg.embed_scale_rule), weight_init=cfg.weight_init,
                       init_shrink_passes=cfg.init_shrink_passes, **method_overrides(cfg))


def make_config(**kwargs):
    try:
        return GPTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        hint = ''
        if sum(kwargs.get(k, 0) > 0 for k in METHOD_COUNTS) > 1 and kwargs.get('n_thoughts') == 1:
            hint = " (train.py's default is PonderLM-2 K=1: pass --n_thoughts=0 for another method)"
        raise UserError(f"bad model config: {e}{hint}") from None


def method_overrides(cfg):
    """The GPTConfig fields cfg sets on any model, also one loaded from Hugging Face."""
    return {'block_size': cfg.block_size, 'n_thoughts': cfg.n_thoughts, 'n_jacobi': cfg.n_jacobi,
            'n_ponder': cfg.n_ponder, 'ponder_multiply': cfg.ponder_multiply, 'n_pause': cfg.n_pause,
            'pause_token_id': cfg.pause_token_id, 'n_loop': cfg.n_loop, 'n_hidden': cfg.n_hidden}


def check_resume_matches(ckpt, path, cfg):
    """The model cfg asks for must be the checkpoint's (else resuming would silently train another)."""
    saved = ckpt.gpt_config()
    if ckpt.pretrained:  # the architecture came from the pretrained model, the method from the config
        wanted = make_config(**{**asdict(saved), **method_overrides(cfg)})
    else:
        wanted = scratch_config(cfg)
    diff = [f"{f.name} {getattr(saved, f.name)!r} (asked {getattr(wanted, f.name)!r})"
            for f in fields(GPTConfig) if getattr(saved, f.name) != getattr(wanted, f.name)]
    if diff:
        raise UserError(f"checkpoint {path} is a different model: {', '.join(diff)}; resume with the config "
                        f"that made it, or start a new run in another out_dir")


def check_pause_token(cfg, data_vocab, model_vocab):
    """Pause's vector is the embedding row pause_token_id: it must be a row of the model (< model_vocab) that no
    token of the data is (>= data_vocab), or real tokens would be read as pauses and the pause vector trained as a
    token. Checked before a model of the config's vocab_size is built (its own check would not say what to do)."""
    p = cfg.pause_token_id
    if cfg.n_pause <= 0 or data_vocab <= p < model_vocab:  # (a negative count is the model config's to refuse)
        return
    what = (f"is a token id of the data ({cfg.data_dir}/meta.json: vocab_size {data_vocab})" if 0 <= p < data_vocab
            else f"is no row of the model's embedding (vocab_size {model_vocab})")
    if model_vocab > data_vocab:
        fix = f"choose a free row ({data_vocab}..{model_vocab - 1}), e.g. --pause_token_id={model_vocab - 1}"
    else:
        padded = data_vocab // 8 * 8 + 8  # a few rows more, a multiple of 8
        fix = f"pad vocab_size by a few rows, e.g. --vocab_size={padded}, and set --pause_token_id={padded - 1}"
    raise UserError(f"pause_token_id={p} {what}: the pause vector needs an embedding row that no token uses; {fix}")


# what a resume may change, but then no longer goes on as the uninterrupted run would have
EXACT_RESUME_KEYS = ('seed', 'jacobi_train_range', 'jacobi_grad_passes', 'thought_dropout', 'learning_rate',
                     'min_lr_ratio', 'weight_decay', 'beta1', 'beta2', 'eps', 'grad_clip')


def resume_notes(saved, cfg):
    """A note naming what cfg changes against saved, the config of the run that made the checkpoint."""
    changed = [f"{k} {getattr(cfg, k)!r} (the checkpoint's run: {saved[k]!r})"
               for k in EXACT_RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if 'batch_size' in saved and 'gradient_accumulation_steps' in saved:
        was = saved['batch_size'] * saved['gradient_accumulation_steps']
        now = cfg.batch_size * cfg.gradient_accumulation_steps
        if was != now:
            changed.append(f"a global batch of {now} sequences (the checkpoint's run: {was})")
    if not changed:
        return []
    why = " (the seed draws the data order and the Jacobi passes R)" if saved.get('seed', cfg.seed) != cfg.seed else ''
    return [f"note: resuming with {', '.join(changed)}: not an exact resume, the run goes on differently from the "
            f"uninterrupted one{why}"]
