"""
Sample from a trained model: a checkpoint of train.py, or a Hugging Face GPT-NeoX / Pythia / PonderLM-2 model.

    python sample.py                                              # out/ckpt.pt with its training data's tokenizer
    python sample.py --out_dir=out-shakespeare-ponder --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --start="The capital of France is" --temperature=0
    python sample.py --init_from=EleutherAI/pythia-160m --start=FILE:prompt.txt --top_k=0 --top_p=0.9
    python sample.py --init_from=path/to/hf_dir --tokenizer=path/to/tokenizer.json --n_jacobi=8
    python sample.py --out_dir=out-shakespeare-ponder --jacobi_tol=1e-3   # prompt passes until thoughts settle
    python sample.py --start=FILE:long.txt --truncate=True        # keep the prompt's last tokens that fit
    python sample.py --num_samples=5 > samples.txt                # stdout holds the samples and nothing else

The tokenizer is the checkpoint's own: for --init_from=resume (or a checkpoint file) the one its training
data was prepared with, which the checkpoint carries (older checkpoints: their data_dir's tokenizer.json, else
meta.json's 'tokenizer'); for a Hugging Face model the tokenizer.json beside its weights.
--tokenizer=pythia|gpt2|PATH overrides it.
The prompt must fit in the model's context (block_size), the new tokens need not: once the context is full
the model sees its last part, a window that slides (GPT.generate_stream). Samples go to stdout (streamed
token by token for a single sample) and nothing else does: notes, the config echo and the throughput (the
last line) go to stderr. Errors are one `error:` line, exit codes as in nanoponder/runtime.py.
"""
import functools
import math
import os
import sys
import time

import torch

from model import settled
from nanoponder.checkpoint import load_init_from
from nanoponder.runtime import UserError, autocast, one_line, resolve_device, resolve_dtype, run_cli
from nanoponder.tokenizer import model_tokenizer, safe_decode

# -----------------------------------------------------------------------------
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a train.py checkpoint file, a Hugging Face directory or hub id
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
tokenizer = ''          # '' = the checkpoint's own; else pythia | gpt2 | path/to/tokenizer.json
patch_method = ''       # an official baseline's Hugging Face directory: ours | pause | loop | ponderlm | vanilla (its
                        # --patch_method); '' = config.json's patch_method (our exports write it), else ours
start = ''              # the prompt, or FILE:path to read it from a file; '' starts from the EOS token
truncate = False        # a prompt longer than the context: keep its last tokens that fit instead of an error
num_samples = 1         # samples of the same prompt, separated by a line of dashes
max_new_tokens = 200    # may exceed the context: the model then sees a sliding window of the text
temperature = 0.8       # 0 = greedy
top_k = 200             # keep the top_k most likely tokens; 0 = off
top_p = 1.0             # nucleus sampling: keep the smallest set with this much probability; 1.0 = off
seed = 1337             # of the sampling
device = 'auto'         # auto (cuda if available, else cpu) | cpu | cuda | cuda:1 | mps
dtype = 'auto'          # auto (bfloat16 autocast where supported, else float32) | float32 | bfloat16 | float16
use_cache = True        # KV cache; False recomputes every token from scratch (the exact, slow reference)
compile = False         # torch.compile the layer stack (CUDA; the first tokens pay for compiling)
stream = None           # print tokens as they come; None = on for a single sample
n_jacobi = None         # PonderLM-2: Jacobi passes over the prompt; None = the model's own n_jacobi
jacobi_tol = None       # PonderLM-2: instead, passes until the prompt's thoughts change by at most this (relative);
                        # 0 = exact. The passes taken go to stderr
# -----------------------------------------------------------------------------
_config_echo = 'stderr'  # configurator.py echoes the keys set on stderr: stdout is the samples, nothing else


# ----------------------------------------------------------------------------- options

def check_options():
    for name, value, ok, rule in (('num_samples', num_samples, num_samples >= 1, '>= 1'),
                                  ('max_new_tokens', max_new_tokens, max_new_tokens >= 1, '>= 1'),
                                  ('temperature', temperature, 0 <= temperature < math.inf,
                                   'finite and >= 0 (0 = greedy)'),
                                  ('top_k', top_k, top_k >= 0, '>= 0 (0 = off)'),
                                  ('top_p', top_p, 0 < top_p <= 1, 'in (0, 1] (1 = off)')):
        if not ok:  # nan fails every comparison
            raise UserError(f"{name}={value} is out of range: {name} must be {rule}")
    if stream not in (None, True, False):
        raise UserError(f"stream must be True, False or None (auto), got {stream!r}")
    if n_jacobi is not None and (not isinstance(n_jacobi, int) or isinstance(n_jacobi, bool) or n_jacobi < 0):
        raise UserError(f"n_jacobi must be an integer >= 0 (or None for the model's own), got {n_jacobi!r}")
    if jacobi_tol is not None and (isinstance(jacobi_tol, bool) or not isinstance(jacobi_tol, (int, float))
                                   or jacobi_tol < 0):
        raise UserError(f"jacobi_tol must be a number >= 0 (or None for fixed passes), got {jacobi_tol!r}")


# ----------------------------------------------------------------------------- the prompt

def read_prompt():
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {one_line(e)}") from None


def encode_prompt(tok, text, config):
    """Prompt token ids that fit in the model's context. The new tokens need not fit with them: generation
    slides the context window past block_size. No prompt at all is fine: generation then starts from the EOS
    token, as at the start of a new document."""
    ids = tok.encode(text) if text else []
    room = config.block_size
    if len(ids) > room:
        if not truncate:
            raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's context of {room}; "
                            f"shorten it, or pass --truncate=True to keep its last {room} tokens")
        print(f"note: prompt truncated from {len(ids)} to its last {room} tokens", file=sys.stderr)
        ids = ids[-room:]
    bad = [i for i in ids if i >= config.vocab_size]
    if bad:
        raise UserError(f"the tokenizer gives id {bad[0]}, beyond the model's vocabulary of {config.vocab_size}: "
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
    passes = []  # the prompt's Jacobi passes (PonderLM-2, cached prefill): the last one reported is their number
    stop = None
    if jacobi_tol is not None:
        settle = settled(jacobi_tol)
        stop = lambda r, z, h: passes.append(r) or settle(r, z, h)  # noqa: E731
    with ctx:
        for idx_next, _ in model.generate_stream(idx, max_new_tokens, temperature, top_k or None,
                                                 top_p if top_p < 1 else None, use_cache, n_jacobi, stop):
            new.append(idx_next.item())  # .item() waits for the GPU: the timing below needs no extra sync
            if printer:
                printer.add(new[-1])
    seconds = time.perf_counter() - t0
    if jacobi_tol is not None and passes:
        print(f"note: the prompt's thoughts took {passes[-1]} Jacobi passes to settle to jacobi_tol={jacobi_tol:g}",
              file=sys.stderr)
    if printer:
        printer.finish()
    else:
        print(decode(prompt + new))
    return new, seconds


def main():
    check_options()
    dev = resolve_device(device)
    device_type = torch.device(dev).type
    ctx = autocast(device_type, resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    model, ckpt, source = load_init_from(init_from, out_dir, patch_method=patch_method)
    tok = model_tokenizer(source, ckpt, tokenizer)
    prompt = encode_prompt(tok, read_prompt(), model.config)
    model.eval().to(dev)
    if compile:
        # the layer stack is what every method's every path of generate runs (Loop runs it without the trunk's
        # final LayerNorm); dynamic: prompt and cache lengths change each call
        model.blocks = torch.compile(model.blocks, dynamic=True)
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
    run_cli(main)
