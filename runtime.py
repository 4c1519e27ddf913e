"""
What every script of nanoPonder shares at run time, in one place:

- user errors: UserError is the one exception type for a mistake the user can act on; run_cli() turns it into
  one `error: ...` line on stderr and the exit code below (under torchrun only rank 0 prints);
- the device and the precision: resolve_device, resolve_dtype (ONE rule for 'auto') and autocast;
- files that are never half-written: atomic_write, and remove_stale_temp_files for the leftovers of a kill;
  DirectoryLock, so that one run owns its out_dir;
- the training checkpoint (train.py writes it; sample.py, eval.py and the experiments read it): Checkpoint,
  the only code that knows its keys and its format version.

Exit codes of every script:
    0    done
    1    the run failed while running: training diverged, out of memory, a download or a disk write failed
    2    the command is wrong: an unknown or out-of-range option or config value (configurator.py too), or a
         file or data directory it names is missing or unusable
    130  stopped by Ctrl-C (SIGINT), after saving where the script saves
    143  stopped by SIGTERM, likewise

    from runtime import UserError, run_cli, resolve_device, resolve_dtype, autocast, Checkpoint
"""
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields

import torch

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A reason to stop that the user can act on: printed as one `error: ...` line, without a traceback.
    exit_code: EXIT_USAGE (default) when the command or what it names is wrong, EXIT_FAILURE (see failure())
    when the run itself failed."""

    def __init__(self, message, exit_code=EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def failure(message):
    """A UserError for a run that failed while running (exit code 1)."""
    return UserError(message, EXIT_FAILURE)


def one_line(text, limit=300):
    """A message as one line, cut at limit characters (state dict mismatches list every key)."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit] + '...'


def is_rank0():
    """True in a single process and on rank 0 of torchrun (which sets RANK): the one process that talks."""
    return os.environ.get('RANK', '0') == '0'


def print_error(message):
    if is_rank0():
        print(f"error: {one_line(message, limit=2000)}", file=sys.stderr, flush=True)


def run_cli(main):
    """Run a script's main(); a UserError ends it with one `error:` line and its exit code, Ctrl-C with 130,
    a closed stdout (`| head`) quietly. Anything else is a bug and keeps its traceback."""
    try:
        code = main()
    except UserError as e:
        print_error(e)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # stdout closed early, e.g. piped into head: not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        code = EXIT_FAILURE
    sys.exit(code or 0)


# -----------------------------------------------------------------------------
# device and precision

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def resolve_device(name):
    """'auto' -> 'cuda' if a GPU is there, else 'cpu'; any other name is checked to exist here."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        raise UserError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    available = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise UserError(f"device={name!r} but {kind} is not available here: use --device=cpu (or auto)")
    if kind == 'cuda' and torch.device(name).index is not None and torch.device(name).index >= torch.cuda.device_count():
        raise UserError(f"device={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def resolve_dtype(name, device_type):
    """The compute dtype (of autocast; weights stay fp32): 'auto' is bfloat16 where matmuls run natively in it,
    a CUDA GPU that supports it or a CPU with AVX512-BF16 or AMX (about 4x the fp32 speed on such a CPU), and
    float32 everywhere else (other CPUs only emulate bf16, MPS); float16 needs CUDA (its loss scaling).
    Returns a torch dtype."""
    if name == 'auto':
        if device_type == 'cuda' and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device_type == 'cpu' and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    if name == 'float16' and device_type != 'cuda':
        raise UserError("dtype='float16' needs CUDA; use bfloat16 or float32")
    return DTYPES[name]


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles), as oneDNN uses them."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these (private) probes: do not guess
        return False


def autocast(device_type, dtype):
    """Mixed precision: weights stay fp32, autocast runs the matmuls in dtype (nothing to do for float32)."""
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # for whatever autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)


# -----------------------------------------------------------------------------
# files that are never half-written

TEMP_SUFFIX = re.compile(r'\.tmp(\d+)$')


@contextmanager
def atomic_write(path, mode='wb'):
    """Open a temp file beside path for writing; on success it is flushed to disk and renamed over path, so a
    reader (or a crash midway) sees the old file or the new one, never half of one. On error it is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_files(directory):
    """Delete the temp files (name.tmpPID) that a killed writer left behind: those whose process is gone.
    Returns their names."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        m = TEMP_SUFFIX.search(name)
        if m and not pid_alive(int(m.group(1))):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to someone else
        return True
    return True


class DirectoryLock:
    """directory/name holds the PID of the process that owns the directory (a training run in its out_dir); a
    second process is refused while the owner lives. A lock whose process is gone (kill -9) is stale: taken over."""

    def __init__(self, directory, name='train.lock'):
        self.directory, self.path = directory, os.path.join(directory, name)
        self.held = False

    def acquire(self):
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self.owner()
                if pid is not None and pid_alive(pid):
                    raise UserError(f"another run (PID {pid}) is using {self.directory} ({self.path}): wait "
                                    f"for it, stop it, or choose another directory") from None
                print(f"note: removing the stale lock of a run that is gone ({self.path}, PID {pid})")
                os.remove(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}")

    def owner(self):
        try:
            with open(self.path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self):
        if self.held and self.owner() == os.getpid():
            os.remove(self.path)
        self.held = False


# -----------------------------------------------------------------------------
# the training checkpoint

CHECKPOINT_FORMAT = 2  # 1: train.py before the format field (still read); 2: 'format' added, init -> weight_init
INIT_RENAMED = {'ponder': 'small', 'pythia': 'normal'}  # format 1's init values -> weight_init


def upgrade_format_1(raw):
    """Format 1 called the weight init `init` with values 'ponder' / 'pythia'; format 2 says weight_init."""
    for d in (raw.get('model_args'), raw.get('config')):
        if isinstance(d, dict) and 'init' in d:
            d['weight_init'] = INIT_RENAMED.get(d.pop('init'), 'small')


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

    def save(self, path):
        with atomic_write(path) as f:
            torch.save({'format': CHECKPOINT_FORMAT, **asdict(self)}, f)

    @classmethod
    def load(cls, path):
        """Read and validate a train.py checkpoint; a missing, foreign or newer file is one UserError."""
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint at {path}")
        try:
            raw = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} is not a train.py checkpoint")
        version = raw.pop('format', 1)
        if version > CHECKPOINT_FORMAT:
            raise UserError(f"{path} has checkpoint format {version}, newer than this code reads "
                            f"({CHECKPOINT_FORMAT}): update nanoPonder (git pull)")
        if version == 1:
            upgrade_format_1(raw)
        required = {f.name for f in fields(cls) if f.name != 'pretrained'}
        missing = required - set(raw)
        if missing:
            raise UserError(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))})")
        return cls(**{f.name: raw.get(f.name) for f in fields(cls)})

    def gpt_config(self):
        from model import GPTConfig
        try:
            return GPTConfig(**self.model_args)
        except (TypeError, ValueError) as e:
            raise UserError(f"the checkpoint's model_args do not fit this model.py: {one_line(e)}") from None

    def build_model(self):
        """The trained model, on the CPU in fp32."""
        from model import GPT
        try:
            return GPT.from_state_dict(self.gpt_config(), self.model)
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
            raise UserError(f"the checkpoint's weights do not fit its model: {one_line(e)}") from None
