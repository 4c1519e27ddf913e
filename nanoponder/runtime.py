"""
What every script of nanoPonder shares at run time, in one place:

- user errors: UserError is the one exception type for a mistake the user can act on; run_cli() turns it into
  one `error: ...` line on stderr and the exit code below (under torchrun only rank 0 prints);
- the device and the precision: resolve_device, resolve_dtype (ONE rule for 'auto') and autocast; on a CPU,
  keep_freed_memory (big tensors reuse freed memory instead of faulting in fresh pages every step);
- files that are never half-written: atomic_write (the one way any file of the project replaces another, with
  fsync), write_json, write_result for a script's results, check_output_file before the work that makes them,
  and remove_stale_temp_files for the leftovers of a kill; DirectoryLock, so that one run owns its out_dir.

Exit codes of every script:
    0    done
    1    the run failed while running: training diverged, out of memory, a download or a disk write failed
    2    the command is wrong: an unknown or out-of-range option or config value, or a file or data directory
         it names is missing or unusable
    130  stopped by Ctrl-C (SIGINT), after saving where the script saves
    143  stopped by SIGTERM, likewise

    from nanoponder.runtime import UserError, run_cli, resolve_device, resolve_dtype, autocast, atomic_write
"""
import ctypes
import json
import os
import platform
import re
import sys
import tempfile
from contextlib import contextmanager, nullcontext

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


TORCH_SEEDS = (-2 ** 63, 2 ** 64 - 1)  # what torch.manual_seed takes
NUMPY_SEEDS = (0, 2 ** 32 - 1)  # what numpy's seeding takes (lm-eval seeds numpy and random too)


def check_seed(value, name='seed', seeds=TORCH_SEEDS):
    """A UserError unless value is a whole number in the range seeds (lo, hi), inclusive."""
    lo, hi = seeds
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise UserError(f"{name} must be a whole number in [{lo:,}, {hi:,}], got {value!r}")


def human(n):
    """A count for people: 1234567 -> '1.23M' (K, M, B); below a thousand as it is."""
    for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n_bytes):
    """A size in bytes for people: '1.23 GB' from 0.1 GB up, else '45.6 MB'."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 0.1e9 else f"{n_bytes / 1e6:.1f} MB"


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
    a CUDA GPU that supports it or a CPU with AVX512-BF16 or AMX, and float32 everywhere else (other CPUs only
    emulate bf16, MPS); float16 needs CUDA (its loss scaling). Returns a torch dtype."""
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


def compile_blocks(model, **options):
    """torch.compile each Block of model in place (regional compilation): every pass of every method runs the same
    Block code, so the compiled graphs are reused whatever the number of passes R. Parameter names do not change."""
    for block in model.layers:
        block.compile(**options)


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
    note_emulated_bf16(device_type, dtype)
    return torch.autocast(device_type, dtype=dtype)


def note_emulated_bf16(device_type, dtype):
    """bf16 on a CPU without bf16 hardware was asked for explicitly ('auto' never picks it there): say so before a
    run that would crawl. On stderr, as stdout may be a script's result (samples, JSON); rank 0 only."""
    if device_type == 'cpu' and dtype == torch.bfloat16 and not cpu_has_native_bf16() and is_rank0():
        print("note: this CPU has no native bf16 matmul (AVX512-BF16 or AMX), so bfloat16 autocast is emulated, "
              "one to two orders of magnitude slower than float32 here; dtype=auto or float32 picks float32",
              file=sys.stderr)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory(device_type):
    """On a CPU under glibc (Linux): malloc keeps the memory of freed tensors for the next ones instead of giving
    it back to the kernel. A training step frees and reallocates the same big tensors every step (the logits and
    their gradient, each weight's gradient); glibc serves every block over 32 MiB with its own mmap and unmaps it
    on free, so the next step touches fresh pages, each one a page fault in which the kernel zeroes it. That is
    ~100K faults a step for a 50k vocabulary, and on a VM they cost a fifth of the step. jemalloc and tcmalloc
    avoid this as well; this needs no LD_PRELOAD. The price: the process's memory stays at its peak (within a few
    percent) until it exits. Left as it is off Linux/glibc, on GPUs, and when the user sets any MALLOC_* variable
    (they are tuning malloc themselves). Returns whether it applied."""
    if device_type != 'cpu' or not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
        return False
    if any(k.startswith('MALLOC_') for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own C library
    except (OSError, AttributeError):
        return False
    # no block gets its own mmap (so none is unmapped on free), and the heap's free top is never trimmed
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


# -----------------------------------------------------------------------------
# files that are never half-written

TEMP_SUFFIX = re.compile(r'\.tmp(\d+)$')


def temp_path(path):
    """The temp file beside path that this process writes before renaming it to path (name.tmpPID: what
    remove_stale_temp_files recognises once the process is gone)."""
    return f"{path}.tmp{os.getpid()}"


@contextmanager
def temp_file(path, mode='wb'):
    """Open path's temp file (temp_path) for writing; on success it is flushed to disk and left complete, for the
    caller to rename into place (several files can then replace their old versions together). On error it is
    removed, and an OSError names path (a full disk's error names no file, or the temp file)."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        raise


def cache_path(*names):
    """A path in nanoPonder's cache of measured figures: $XDG_CACHE_HOME/nanoponder/... (~/.cache by default)."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'nanoponder', *names)


@contextmanager
def atomic_write(path, mode='wb'):
    """Write path through its temp file (temp_file), renamed over path once complete: a reader (or a crash midway)
    sees the old file or the new one, never half of one."""
    with temp_file(path, mode) as f:
        yield f
    move_into_place(path)


def move_into_place(path):
    """Rename path's complete temp file (temp_path, written by temp_file) over path, atomically: the one place where
    a file of the project replaces another. On failure the temp file goes."""
    try:
        os.replace(temp_path(path), path)
    except BaseException:
        if os.path.exists(temp_path(path)):
            os.remove(temp_path(path))
        raise


@contextmanager
def write_result(path, mode='wb'):
    """atomic_write for a script's results, into a directory made if needed: a write that fails (disk full, file
    too large) is one line, exit 1, and the file it would have replaced is unchanged."""
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with atomic_write(path, mode) as f:
            yield f
    except OSError as e:
        kept = (f"the earlier {os.path.basename(path)} is unchanged" if os.path.exists(path) else
                "no partial file is left")
        raise failure(f"could not write {path}: {e.strerror or one_line(e)}; {kept}") from None


def write_json(path, obj):
    """obj as indented JSON in path, by write_result: whole or not at all, a failure one line (exit 1)."""
    with write_result(path, 'w') as f:
        json.dump(obj, f, indent=2, default=str)
        f.write('\n')


def check_output_file(path, option):
    """Check, before the work whose results go to the file path, that it can be written there: so that an unusable
    path is one UserError now and not an exception after the work. option says where path came from, e.g. '--json'."""
    if os.path.isdir(path):
        raise UserError(f"{option}: {path} is a directory: name a file (in it, or elsewhere)")
    check_output_dir(os.path.dirname(os.path.abspath(path)), option, path)


def check_output_dir(directory, option, wanted=None):
    """Check that files can be written in directory, which may not exist yet: its deepest existing ancestor must be
    a directory where a probe file can be created (and is removed; nothing is made). wanted: the path that the
    messages name (default directory)."""
    wanted = wanted or directory
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{option}: cannot write {wanted}: {existing} is a file, not a directory; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{option}: cannot write {wanted}: no file can be created in {existing} "
                        f"({e.strerror or one_line(e)}); choose another path") from None


def remove_stale_temp_files(directory, names=None):
    """Delete the temp files (name.tmpPID) that a killed writer left behind: those whose process is gone, and of
    names only, if given (the files that writer writes; other such files in the directory may be the user's).
    Returns their names."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        m = TEMP_SUFFIX.search(name)
        if m and (names is None or name[:m.start()] in names) and not pid_alive(int(m.group(1))):
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
    except (PermissionError, OverflowError):  # exists, but belongs to someone else; or no process id at all
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
