"""
The training checkpoint and what --init_from names.

- Checkpoint: everything a training run needs to go on exactly, in one file read with weights_only=True; the only
  code that knows its keys and its format version. save_run and restore_run: a run's state into one and back.
- resolve_init_from / load_init_from: ONE rule, decided by what is on disk, for what a script's --init_from names
  ('resume', a checkpoint file under any name, a Hugging Face directory, a hub id), and the one call that loads it,
  whatever the script.

    from nanoponder.checkpoint import Checkpoint, load_init_from
    model, ckpt, source = load_init_from('out/ckpt.pt', out_dir='out')
"""
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch

from model import GPT, GPTConfig
from nanoponder.hf import checked_overrides, download_from_hub, load_pretrained
from nanoponder.runtime import (UserError, failure, is_rank0, move_into_place, one_line, temp_path,
                                write_result)

# 1: before the format field (still read); 2: 'format' added, init -> weight_init; 3: jacobi_train_range
# moved from model_args (the model) to config (the training run). Fields added with a default (pretrained,
# tokenizer) need no new format: older files load without them, older code ignores them.
CHECKPOINT_FORMAT = 3
INIT_RENAMED = {'ponder': 'small', 'pythia': 'normal'}  # format 1's init values -> weight_init


def upgrade_format_1(raw):
    """Format 1 called the weight init `init` with values 'ponder' / 'pythia'; format 2 says weight_init."""
    for d in (raw.get('model_args'), raw.get('config')):
        if isinstance(d, dict) and 'init' in d:
            d['weight_init'] = INIT_RENAMED.get(d.pop('init'), 'small')


def upgrade_format_2(raw):
    """Format 2 kept jacobi_train_range in model_args; format 3 keeps it with the run's other settings in config."""
    model_args, config = raw.get('model_args'), raw.get('config')
    if isinstance(model_args, dict) and 'jacobi_train_range' in model_args:
        r = model_args.pop('jacobi_train_range')
        if isinstance(config, dict):
            config.setdefault('jacobi_train_range', tuple(r))


@dataclass
class Checkpoint:
    """Everything a training run needs to go on exactly, as tensors and plain Python values only, so that
    torch.load(weights_only=True) reads it. One file, whatever the number of processes that wrote it."""
    model_args: dict        # GPTConfig fields
    model: dict             # the model's state dict (no compile/DDP prefixes)
    optimizer: dict         # AdamW state dict
    scaler: dict            # GradScaler state dict (fp16 only; empty otherwise)
    iter_num: int           # iterations done
    data_state: dict        # {'epoch', 'position'}: where the next iteration reads
    rng: dict               # {'cpu': ..., 'cuda': ...} generator states
    best_val_loss: float
    config: dict            # the run's config keys and values (data_dir, ...)
    pretrained: str = None  # the Hugging Face model the run started from, or None
    # the tokenizer of the data it was trained on, so that it is sampled and scored without that data directory:
    # {'name', 'eos_token', 'json': the tokenizer.json text (None for gpt2), 'sha256': the data's identity
    # (meta.json's tokenizer_sha256; None if unknown)}, tokenizer.tokenizer_record. None in older checkpoints.
    tokenizer: dict = None

    def save(self, path):
        """Write the checkpoint atomically; a failed write (disk full, a file size limit) is one line, exit 1,
        and the previous file at path is kept (write_result)."""
        with write_result(path) as f:
            try:
                torch.save({'format': CHECKPOINT_FORMAT, **asdict(self)}, f)
            except RuntimeError as e:  # torch's zip writer reports the file's OSError as its own RuntimeError
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise

    @classmethod
    def load(cls, path):
        """Read and validate a training checkpoint; a missing, foreign or newer file is one UserError."""
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint at {path}")
        try:
            with warnings.catch_warnings():  # the unpickler's warnings about a foreign file: the line below says it
                warnings.simplefilter('ignore')
                raw = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:  # torch's words are no help here ("KeyError: 101"), its advice unsafe (weights_only=False)
            raise UserError(f"cannot read {path} as a train.py checkpoint: it is another kind of file, or a "
                            f"damaged one") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} is not a train.py checkpoint")
        version = raw.pop('format', 1)
        if version > CHECKPOINT_FORMAT:
            raise UserError(f"{path} has checkpoint format {version}, newer than this code reads "
                            f"({CHECKPOINT_FORMAT}): update nanoPonder (git pull)")
        if version == 1:
            upgrade_format_1(raw)
        if version <= 2:
            upgrade_format_2(raw)
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = required - set(raw)
        if missing:
            raise UserError(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))})")
        mistyped = [f.name for f in fields(cls)
                    if f.type is dict and not isinstance(raw.get(f.name, {}), (dict, type(None)))]
        if mistyped:  # a crafted or foreign file: its values would fail later with Python's words
            raise UserError(f"{path} is not a train.py checkpoint ({', '.join(mistyped)} not a dict)")
        return cls(**{f.name: raw.get(f.name) for f in fields(cls)})

    def gpt_config(self):
        try:
            return GPTConfig(**self.model_args)
        except (TypeError, ValueError) as e:
            raise UserError(f"the checkpoint's model_args do not fit this model.py: {one_line(e)}") from None

    def build_model(self, **overrides):
        """The trained model on the CPU in fp32, holding the checkpoint's tensors themselves (not a copy of them);
        overrides replace GPTConfig fields that change no weight (e.g. n_jacobi=5)."""
        config = self.gpt_config()
        if overrides:
            try:
                config = replace(config, **checked_overrides(overrides))
            except ValueError as e:
                raise UserError(one_line(e)) from None
        with torch.device('meta'):  # no time spent on a random init
            model = GPT(config)
        # (a compiled or DDP model saves its weights under a prefix)
        state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v.float().contiguous()
                 for k, v in self.model.items()}  # (fp32 contiguous: the same tensor)
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:  # missing or unexpected keys, wrong shapes
            raise UserError(f"the checkpoint's weights do not fit its model: {one_line(e)}") from None
        model.init_rope()  # the rotary tables are buffers that no checkpoint holds
        return model


def save_run(path, model, optimizer, scaler, device, distributed, best_path=None, **fields):
    """Every rank of a training run: the run's state becomes the checkpoint at path (and at best_path, if given),
    the model and optimizer gathered to rank 0 under fsdp and written by it atomically. fields: the Checkpoint's
    other fields (iter_num, data_state, best_val_loss, config, pretrained, tokenizer). Returns False and writes
    nothing when a parameter is not finite on some rank: a model that diverged is never saved."""
    from nanoponder.parallel import all_ranks_agree, full_state, local_tensors  # (loading needs no process code)
    if not all_ranks_agree(all(bool(torch.isfinite(p).all()) for p in local_tensors(model)), distributed):
        return False
    model_state, optimizer_state = full_state(model, optimizer)  # fsdp: {} on ranks > 0
    if is_rank0():
        rng = {'cpu': torch.get_rng_state()}
        if device.startswith('cuda'):
            rng['cuda'] = torch.cuda.get_rng_state(device)
        Checkpoint(model_args=asdict(model.config), model=model_state, optimizer=optimizer_state,
                   scaler=scaler.state_dict(), rng=rng, **fields).save(path)
        if best_path:
            link_best(path, best_path)
    return True


def link_best(ckpt_path, best_path):
    """best.pt = the checkpoint just saved. A hard link costs no time or disk, and keeps this version when
    ckpt.pt is later replaced by a new file; a copy where the file system has no links."""
    try:
        os.link(ckpt_path, temp_path(best_path))
    except OSError:
        with open(ckpt_path, 'rb') as src, write_result(best_path) as dst:
            dst.write(src.read())
        return
    move_into_place(best_path)


def restore_run(ckpt, model, optimizer, scaler, device):
    """A resumed run's state from its checkpoint, whose weights model holds already: the optimizer (each rank its
    shard under fsdp), the loss scaler and the random generators -> (iter_num, epoch, position, best_val_loss)."""
    from nanoponder.parallel import load_optimizer_state
    load_optimizer_state(model, optimizer, ckpt.optimizer)
    scaler.load_state_dict(ckpt.scaler)
    torch.set_rng_state(ckpt.rng['cpu'])
    if 'cuda' in ckpt.rng and device.startswith('cuda'):
        torch.cuda.set_rng_state(ckpt.rng['cuda'], device)
    return ckpt.iter_num, ckpt.data_state['epoch'], ckpt.data_state['position'], ckpt.best_val_loss


# -----------------------------------------------------------------------------
# --init_from: what it names, by one rule for every script

INIT_FROM_CHOICES = ("'resume' (out_dir/ckpt.pt), a train.py checkpoint file, a Hugging Face model directory or a "
                     "hub id (owner/name)")
HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?')  # the Hub's names: [owner/]name
LOCAL_SUFFIXES = ('.pt', '.pth', '.ckpt', '.bin', '.safetensors', '.json')  # a file's name, not a hub id


def resolve_init_from(init_from, out_dir, choices=INIT_FROM_CHOICES):
    """What init_from names, decided by what is on disk: ('checkpoint', path) for 'resume' (out_dir/ckpt.pt) and
    any existing file (a training checkpoint), ('hf', path) for an existing directory (a Hugging Face model), and
    ('hub', id) for a name that can only be a hub id. An empty name, a missing resume checkpoint, a directory
    without config.json and a local-looking path that is not there are one UserError each. choices: what
    init_from may be, for the messages."""
    if not init_from:
        raise UserError(f"init_from is empty: pass {choices}")
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.isfile(path):
            raise UserError(f"init_from=resume reads out_dir/ckpt.pt, and there is no {path}: pass the --out_dir of "
                            f"a train.py run (or train one: python train.py config/shakespeare_ponder.py), or "
                            f"another --init_from")
        return 'checkpoint', path
    path = os.path.expanduser(init_from)
    if os.path.isfile(path):
        hf_dir = os.path.dirname(path) or '.'
        if path.endswith(('.safetensors', '.bin', '.json')) and os.path.isfile(os.path.join(hf_dir, 'config.json')):
            raise UserError(f"init_from={init_from} is a file of the Hugging Face model directory {hf_dir}: pass "
                            f"--init_from={hf_dir}")
        return 'checkpoint', path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'config.json')):
            ckpt = os.path.join(init_from, 'ckpt.pt')
            hint = (f"; it holds a train.py checkpoint: pass --init_from={ckpt} (or --out_dir={init_from} "
                    f"--init_from=resume)" if os.path.isfile(os.path.join(path, 'ckpt.pt')) else
                    ": a Hugging Face model directory holds config.json and model.safetensors")
            raise UserError(f"init_from={init_from} is a directory but no Hugging Face model directory (it has no "
                            f"config.json){hint}")
        return 'hf', path
    parent = os.path.dirname(path)
    if not HUB_ID.fullmatch(init_from) or init_from.endswith(LOCAL_SUFFIXES) or (parent and os.path.isdir(parent)):
        raise UserError(f"no such file or directory: {init_from} (init_from takes {choices})")
    return 'hub', init_from


def load_init_from(init_from, out_dir, choices=INIT_FROM_CHOICES, patch_method='', **overrides):
    """The model that init_from names (resolve_init_from) -> (model on the CPU in fp32, its Checkpoint or None,
    the checkpoint file, Hugging Face directory or hub id it came from). patch_method: for a Hugging Face model,
    which official modeling file trained it (hf.config_from_hf); '' = what its config.json says. overrides replace
    GPTConfig fields (hf.load_pretrained's). Every mistake is one UserError (weights that are not finite too: a
    model that diverged); a failed download exits with 1."""
    kind, source = resolve_init_from(init_from, out_dir, choices)
    ckpt = None
    if kind == 'checkpoint':
        if patch_method:
            raise UserError(f"patch_method={patch_method} says which official modeling file trained a Hugging Face "
                            f"model; {source} is a training checkpoint, which records its method: leave it out")
        ckpt = Checkpoint.load(source)
        model = ckpt.build_model(**overrides)
    else:
        path = source
        if kind == 'hub':
            try:
                path = download_from_hub(source)
            except RuntimeError as e:
                raise failure(one_line(e)) from None
        try:
            model = load_pretrained(path, patch_method=patch_method or None, **overrides)
        except (OSError, ValueError) as e:  # a missing or damaged file, a config this model does not compute
            raise UserError(f"cannot load the Hugging Face model {source}: {one_line(e)}") from None
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise UserError(f"{source} holds weights that are not finite (NaN or inf) in {', '.join(broken[:3])}"
                        f"{', ...' if len(broken) > 3 else ''}: the model diverged, or the file is damaged; use an "
                        f"earlier checkpoint (train.py keeps best.pt beside ckpt.pt)")
    return model, ckpt, source
