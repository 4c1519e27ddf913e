"""
Sample from a trained model: a checkpoint of train.py, or a Hugging Face GPT-NeoX / Pythia / PonderLM-2 model.

    python sample.py                                              # out/ckpt.pt with its training data's tokenizer
    python sample.py --out_dir=out-shakespeare-ponder --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --start="The capital of France is" --temperature=0
    python sample.py --init_from=EleutherAI/pythia-160m --start=FILE:prompt.txt --top_k=0 --top_p=0.9
    python sample.py --init_from=path/to/hf_dir --tokenizer=path/to/tokenizer.json --n_jacobi=8
    python sample.py --start=FILE:long.txt --truncate=True        # keep the prompt's last tokens that fit

The tokenizer is the checkpoint's own: for --init_from=resume (or a path to a ckpt.pt) the one its training
data was prepared with (data_dir/tokenizer.json, else meta.json's 'tokenizer'); for a Hugging Face model
the tokenizer.json beside its weights. --tokenizer=pythia|gpt2|PATH overrides it.
Samples go to stdout (streamed token by token for a single sample), the throughput to stderr's last line.
"""
import functools
import json
import os
import pickle
import sys
import time
from contextlib import nullcontext

import torch

from model import GPT, GPTConfig
from prepare_data import DataError, load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a path to a ckpt.pt, or a Hugging Face hub id or directory
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
tokenizer = ''          # '' = the checkpoint's own; else pythia | gpt2 | path/to/tokenizer.json
start = ''              # the prompt, or FILE:path to read it from a file; '' starts from the EOS token
truncate = False        # a prompt too long for the context: keep its last tokens that fit instead of an error
num_samples = 1
max_new_tokens = 200
temperature = 0.8       # 0 = greedy
top_k = 200             # keep the top_k most likely tokens; 0 = off
top_p = 1.0             # nucleus sampling: keep the smallest set with this much probability; 1.0 = off
seed = 1337
device = 'auto'         # auto (cuda if available, else cpu) | cpu | cuda | cuda:1 | mps
dtype = 'auto'          # auto (bfloat16 autocast where supported, else float32) | float32 | bfloat16 | float16
use_cache = True        # KV cache; False recomputes every token from scratch (the exact, slow reference)
compile = False         # torch.compile the transformer trunk (CUDA; the first tokens pay for compiling)
stream = None           # print tokens as they come; None = on for a single sample
n_jacobi = None         # PonderLM-2: Jacobi passes over the prompt; None = the model's own n_jacobi
# -----------------------------------------------------------------------------


class SampleError(Exception):
    """A user mistake (bad option, missing file, prompt too long); reported as one `error:` line."""


def one_line(e, limit=300):
    """An exception's message as one line, cut at limit characters (state dict mismatches list every key)."""
    text = ' '.join(str(e).split())
    return text if len(text) <= limit else text[:limit] + '...'


# ----------------------------------------------------------------------------- options

def check_options():
    for name, value, ok in (('num_samples', num_samples, num_samples >= 1),
                            ('max_new_tokens', max_new_tokens, max_new_tokens >= 1),
                            ('temperature', temperature, temperature >= 0),
                            ('top_k', top_k, top_k >= 0),
                            ('top_p', top_p, 0 < top_p <= 1)):
        if not ok:
            raise SampleError(f"{name}={value} is out of range (num_samples, max_new_tokens >= 1; temperature, "
                              f"top_k >= 0; 0 < top_p <= 1)")
    if stream not in (None, True, False):
        raise SampleError(f"stream must be True, False or None (auto), got {stream!r}")
    if n_jacobi is not None and (not isinstance(n_jacobi, int) or isinstance(n_jacobi, bool) or n_jacobi < 0):
        raise SampleError(f"n_jacobi must be an integer >= 0 (or None for the model's own), got {n_jacobi!r}")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise SampleError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")


def pick_device():
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SampleError(f"unknown device {device!r} (auto, cpu, cuda, cuda:1, mps)") from None
    available = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if not available.get(kind, True):
        raise SampleError(f"device {device!r} asked for, but {kind} is not available here (try --device=cpu)")
    return device


def autocast_context(device_type):
    """bf16 autocast on GPUs that support it, else plain fp32 (CPU autocast is slow and not more exact)."""
    name = dtype
    if name == 'auto':
        name = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if name == 'float32':
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, name))


# ----------------------------------------------------------------------------- the model and its tokenizer

def checkpoint_path():
    """The ckpt.pt to resume from, or None when init_from names a Hugging Face model."""
    if init_from == 'resume':
        return os.path.join(out_dir, 'ckpt.pt')
    if init_from.endswith('.pt'):
        return init_from
    return None


def load_checkpoint(path):
    """A train.py checkpoint -> (model, ckpt dict)."""
    if not os.path.isfile(path):
        raise SampleError(f"no checkpoint at {path}: train one first (e.g. python train.py "
                          f"config/shakespeare_ponder.py, then --out_dir=out-shakespeare-ponder here) or pass "
                          f"--init_from=a Hugging Face model")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        config = GPTConfig(**ckpt['model_args'])
        state_dict = ckpt['model']
    except (KeyError, TypeError, pickle.UnpicklingError) as e:  # not a train.py checkpoint, or an incompatible one
        raise SampleError(f"{path} is not a checkpoint this model.py can read ({type(e).__name__}: "
                          f"{one_line(e, 120)})") from None
    model = GPT.from_state_dict(config, state_dict)
    return model, ckpt


def load_model():
    """-> (model, ckpt dict or None). Loading errors become one SampleError line."""
    path = checkpoint_path()
    try:
        if path is not None:
            return load_checkpoint(path)
        if not os.path.isdir(init_from) and (init_from.startswith(('.', '/')) or init_from.count('/') > 1):
            raise SampleError(f"init_from={init_from}: no such directory (a hub id looks like owner/name)")
        return GPT.from_pretrained(init_from), None
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        raise SampleError(f"could not load {path or init_from}: {one_line(e)}") from None


def data_dir_tokenizer(data_dir):
    """The tokenizer a prepared data directory was made with: its tokenizer.json copy, else meta['tokenizer']."""
    meta_path = os.path.join(data_dir, 'meta.json')
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    eos_token = meta.get('eos_token', '<|endoftext|>')  # prepare_data's --eos_token, if it was changed
    if os.path.isfile(os.path.join(data_dir, 'tokenizer.json')):
        return load_tokenizer(os.path.join(data_dir, 'tokenizer.json'), eos_token)
    if not meta.get('tokenizer'):
        raise SampleError(f"cannot tell the checkpoint's tokenizer: no tokenizer.json, and no meta.json naming one, "
                          f"in its data_dir {data_dir}; pass --tokenizer=pythia|gpt2|path/to/tokenizer.json")
    return load_tokenizer(meta['tokenizer'], eos_token)


def hub_tokenizer_path(repo_id):
    """tokenizer.json of a hub model (from_pretrained has usually cached it already); None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, 'tokenizer.json')
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of the next one: it must come first)
        raise SampleError(f"could not get tokenizer.json of {repo_id} (offline?); "
                          f"pass --tokenizer=path/to/tokenizer.json") from None
    except EntryNotFoundError:  # the repository has no tokenizer.json
        return None
    except Exception as e:
        raise SampleError(f"could not get tokenizer.json of {repo_id} ({type(e).__name__}); "
                          f"pass --tokenizer=path/to/tokenizer.json") from None


def checkpoint_tokenizer(ckpt):
    """The tokenizer that goes with init_from (see the docstring at the top)."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    if ckpt is not None:
        data_dir = ckpt.get('config', {}).get('data_dir')
        if not data_dir:
            raise SampleError("the checkpoint does not record its data_dir; pass --tokenizer=pythia|gpt2|PATH")
        if not os.path.isdir(data_dir):  # a relative data_dir is relative to where train.py ran: try the repo
            here = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_dir)
            data_dir = here if os.path.isdir(here) else data_dir
        return data_dir_tokenizer(data_dir)
    path = os.path.join(init_from, 'tokenizer.json') if os.path.isdir(init_from) else hub_tokenizer_path(init_from)
    if path is None or not os.path.isfile(path):
        raise SampleError(f"no tokenizer.json beside the weights of {init_from}; pass --tokenizer=pythia "
                          f"(every Pythia-based model uses it) or --tokenizer=path/to/tokenizer.json")
    return load_tokenizer(path)


def safe_decode(tok, ids):
    """Text of ids, leaving out ids the tokenizer does not have: the model's vocabulary is padded (Pythia's
    50304 rows against the tokenizer's 50277 ids), and an untrained padding row can still be sampled."""
    return tok.decode([i for i in ids if i < tok.vocab_size])


# ----------------------------------------------------------------------------- the prompt

def read_prompt():
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        raise SampleError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"cannot read prompt file {path}: {one_line(e)}") from None


def encode_prompt(tok, text, config):
    """Prompt token ids that fit in the context together with max_new_tokens. None at all is fine: generation
    then starts from the EOS token, as at the start of a new document."""
    ids = tok.encode(text) if text else []
    room = config.block_size - max_new_tokens
    if room < 1:
        raise SampleError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                          f"of {config.block_size} tokens")
    if len(ids) > room:
        if not truncate:
            raise SampleError(f"the prompt is {len(ids)} tokens, and with max_new_tokens={max_new_tokens} that "
                              f"exceeds the model's context of {config.block_size}; shorten it, lower "
                              f"--max_new_tokens, or pass --truncate=True to keep its last {room} tokens")
        print(f"note: prompt truncated from {len(ids)} to its last {room} tokens", file=sys.stderr)
        ids = ids[-room:]
    bad = [i for i in ids if i >= config.vocab_size]
    if bad:
        raise SampleError(f"the tokenizer gives id {bad[0]}, beyond the model's vocabulary of {config.vocab_size}: "
                          f"it is not this model's tokenizer")
    return ids


# ----------------------------------------------------------------------------- generating

class TextStream:
    """Prints the text of a growing list of token ids as it grows. A character made of several tokens
    (a byte-level BPE splits emoji and CJK into bytes) decodes to U+FFFD until its last byte comes, so text
    ending in U+FFFD waits for the next token. Each step decodes only the ids since the last printed chunk,
    plus that chunk again as context (a decoder may treat a token differently at the start of the text)."""

    def __init__(self, decode, ids):
        self.decode, self.ids = decode, list(ids)
        # ids[prefix:read] were printed already (kept as context); ids[read:] are not yet
        self.prefix, self.read = max(0, len(self.ids) - 5), len(self.ids)

    def add(self, token):
        self.ids.append(token)
        done = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith('\ufffd'):
            self.write(text[len(done):])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self):
        done = self.decode(self.ids[self.prefix:self.read])
        self.write(self.decode(self.ids[self.prefix:])[len(done):] + '\n')

    @staticmethod
    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()


def generate_one(model, prompt, tok, ctx, device_type):
    """Generate one sample after the prompt ids, printing it (streamed or at the end); return the new ids and
    the seconds it took."""
    idx = torch.tensor([prompt or [tok.eos_id]], dtype=torch.long, device=model.embed_in.weight.device)
    decode = functools.partial(safe_decode, tok)
    streaming = stream if stream is not None else num_samples == 1
    printer = None
    if streaming:
        TextStream.write(decode(prompt))
        printer = TextStream(decode, prompt)
    new = []
    sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with ctx:
        for idx_next, _ in model.generate_stream(idx, max_new_tokens, temperature, top_k or None,
                                                 top_p if top_p < 1 else None, use_cache, n_jacobi):
            new.append(idx_next.item())  # .item() waits for the GPU: the timing below needs no extra sync
            if printer:
                printer.add(new[-1])
    seconds = time.perf_counter() - t0
    if printer:
        printer.finish()
    else:
        print(decode(prompt + new))
    return new, seconds


def main():
    check_options()
    dev = pick_device()
    device_type = 'cuda' if dev.startswith('cuda') else dev
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    model, ckpt = load_model()
    tok = checkpoint_tokenizer(ckpt)
    prompt = encode_prompt(tok, read_prompt(), model.config)
    model.eval().to(dev)
    if compile:
        # the trunk is what every path of generate runs; dynamic: prompt and cache lengths change each call
        model.trunk = torch.compile(model.trunk, dynamic=True)
    ctx = autocast_context(device_type)
    total_tokens, total_seconds, unknown = 0, 0.0, 0
    for k in range(num_samples):
        if k:
            print('---------------')
        new, seconds = generate_one(model, prompt, tok, ctx, device_type)
        total_tokens += len(new)
        total_seconds += seconds
        unknown += sum(i >= tok.vocab_size for i in new)
    if unknown:
        print(f"note: {unknown} sampled id(s) were beyond the tokenizer's {tok.vocab_size} ids (the model's padded "
              f"vocabulary) and are left out of the text", file=sys.stderr)
    rate = total_tokens / max(total_seconds, 1e-9)
    print(f"generated {total_tokens} tokens in {total_seconds:.2f} s: {rate:.1f} tokens/s", file=sys.stderr)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        main()
    except (SampleError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early, e.g. piped into head: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        sys.exit(1)
