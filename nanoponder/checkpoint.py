"""
The training checkpoint and what --init_from names.

- Checkpoint: everything a training run needs to go on exactly, in one file read with weights_only=True; the only
  code that knows its keys and its format version.
- resolve_init_from / load_init_from: ONE rule, decided by what is on disk, for what a script's --init_from names
  ('resume', a checkpoint file under any name, a Hugging Face directory, a hub id), and loading it.

    from nanoponder.checkpoint import Checkpoint, load_init_from
    model, ckpt, source = load_init_from('out/ckpt.pt', out_dir='out')
"""
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, fields

import torch

from model import GPTConfig
from nanoponder.hf import download_from_hub, empty_model, load_pretrained
from nanoponder.runtime import UserError, failure, one_line, write_result

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

    def build_model(self):
        """The trained model, on the CPU in fp32."""
        try:
            return model_from_weights(self.gpt_config(), self.model)
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
            raise UserError(f"the checkpoint's weights do not fit its model: {one_line(e)}") from None


def model_from_weights(config, state_dict):
    """GPT(config) on the CPU holding a checkpoint's weights (a compiled or DDP model saves them under a prefix)."""
    model = empty_model(config)
    model.load_state_dict({k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in state_dict.items()})
    return model


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


def load_hf_model(source, **overrides):
    """load_pretrained(source, **overrides) for a Hugging Face directory or hub id: a download that fails is
    exit 1 (the run failed), a model this code cannot read exit 2, each one UserError."""
    path = source
    if not os.path.isdir(source):
        try:
            path = download_from_hub(source)
        except RuntimeError as e:
            raise failure(one_line(e)) from None
    try:
        return load_pretrained(path, **overrides)
    except (OSError, ValueError) as e:  # a missing or damaged file, a config this model does not compute
        raise UserError(f"cannot load the Hugging Face model {source}: {one_line(e)}") from None


def load_init_from(init_from, out_dir, choices=INIT_FROM_CHOICES, patch_method=''):
    """The model that init_from names (resolve_init_from) -> (model on the CPU in fp32, its Checkpoint or None,
    the checkpoint file, Hugging Face directory or hub id it came from). patch_method: for a Hugging Face model,
    which official modeling file trained it (hf.config_from_hf); '' = what its config.json says. Every mistake is
    one UserError."""
    kind, source = resolve_init_from(init_from, out_dir, choices)
    if kind == 'checkpoint':
        if patch_method:
            raise UserError(f"patch_method={patch_method} says which official modeling file trained a Hugging Face "
                            f"model; {source} is a training checkpoint, which records its method: leave it out")
        ckpt = Checkpoint.load(source)
        return ckpt.build_model(), ckpt, source
    return load_hf_model(source, patch_method=patch_method or None), None, source
