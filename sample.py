"""
Sample from a trained model: a checkpoint of train.py, or a Hugging Face GPT-NeoX / Pythia / PonderLM-2 model.

    python sample.py                                              # out/ckpt.pt with its training data's tokenizer
    python sample.py --out_dir=out-shakespeare-ponder --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=zeng123/PonderLM-2-Pythia-1.4b --start="The capital of France is" --temperature=0
    python sample.py --init_from=EleutherAI/pythia-160m --start=FILE:prompt.txt --top_k=0 --top_p=0.9
    python sample.py --out_dir=out-shakespeare-ponder --jacobi_tol=1e-3   # prompt passes until thoughts settle
    python sample.py --out_dir=out-shakespeare-ponder --think_threshold=0.9   # think only where unsure
    python sample.py --num_samples=5 > samples.txt                # stdout holds the samples and nothing else
    python sample.py --out_dir=out-shakespeare-ponder --lens=True 2> lens.txt   # each pass's guess per token

The tokenizer is the model's own (a checkpoint carries its data's); --tokenizer=pythia|gpt2|PATH overrides it. The
prompt must fit in the model's context, the new tokens need not (the window slides: model.generate_stream). stdout
holds the samples and nothing else: notes, the config echo and the tokens/s go to stderr. --lens=True writes to
stderr, after each sample, a line per new token: each pass's top-1 and its probability (nanoponder/lens.py), read
again teacher-forced with exact thoughts (what decoding computes after the prompt), then the token chosen.
"""
import math
import os
import sys
import time

import torch

from model import generate_stream, settled
from nanoponder import kernels
from nanoponder.checkpoint import load_init_from
from nanoponder.lens import pass_names, sample_lines
from nanoponder.runtime import UserError, autocast, check_seed, one_line, resolve_device, resolve_dtype, run_cli
from nanoponder.tokenizer import TextStream, model_tokenizer, safe_decode

# -----------------------------------------------------------------------------
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a train.py checkpoint file, a Hugging Face directory or hub id
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
tokenizer = ''          # '' = the checkpoint's own; else pythia | gpt2 | path/to/tokenizer.json
patch_method = ''       # an official directory's --patch_method: ours | pause | loop | ponderlm | vanilla; '' = its own
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
lens = False            # after each sample, each pass's top-1 per new token, on stderr (see above)
think_threshold = 1.0   # PonderLM-2: a token stops thinking once a readout's top probability exceeds this (the
                        # prompt then goes token by token); 1 = always think (docs/evaluation.md, adaptive thoughts)
# -----------------------------------------------------------------------------
_config_echo = 'stderr'  # configurator.py echoes the keys set on stderr: stdout is the samples, nothing else


def check_options():
    for name, value, ok, rule in (('num_samples', num_samples, num_samples >= 1, '>= 1'),
                                  ('max_new_tokens', max_new_tokens, max_new_tokens >= 1, '>= 1'),
                                  ('temperature', temperature, 0 <= temperature < math.inf,
                                   'finite and >= 0 (0 = greedy)'),
                                  ('top_k', top_k, top_k >= 0, '>= 0 (0 = off)'),
                                  ('top_p', top_p, 0 < top_p <= 1, 'in (0, 1] (1 = off)'),
                                  ('think_threshold', think_threshold, 0 <= think_threshold <= 1,
                                   'in [0, 1] (1 = always think)')):
        if not ok:  # nan fails every comparison
            raise UserError(f"{name}={value} is out of range: {name} must be {rule}")
    if stream not in (None, True, False):
        raise UserError(f"stream must be True, False or None (auto), got {stream!r}")
    if lens not in (True, False):
        raise UserError(f"lens must be True or False, got {lens!r}")
    if think_threshold < 1 and (jacobi_tol is not None or n_jacobi is not None):
        print("note: with think_threshold < 1 the prompt goes token by token through the cache: n_jacobi and "
              "jacobi_tol are not used", file=sys.stderr)
    if n_jacobi is not None and (not isinstance(n_jacobi, int) or isinstance(n_jacobi, bool) or n_jacobi < 0):
        raise UserError(f"n_jacobi must be an integer >= 0 (or None for the model's own), got {n_jacobi!r}")
    if jacobi_tol is not None and (type(jacobi_tol) not in (int, float) or jacobi_tol < 0):
        raise UserError(f"jacobi_tol must be a number >= 0 (or None for fixed passes), got {jacobi_tol!r}")
    check_seed(seed)


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
    """Prompt token ids that fit in the model's context (none at all: generation starts from the EOS token)."""
    ids = tok.encode(text) if text else []
    room = config.block_size
    if len(ids) > room:
        if not truncate:
            raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's context of {room}; "
                            f"shorten it, or pass --truncate=True to keep its last {room} tokens")
        print(f"note: prompt truncated from {len(ids)} to its last {room} tokens", file=sys.stderr)
        ids = ids[-room:]
    return ids


def generate_one(model, prompt, tok, ctx, device_type):
    """Generate one sample after the prompt ids and print it (streamed, or at the end) -> (new ids, seconds)."""
    context = prompt or [tok.eos_id]  # no prompt: generation starts from the EOS token
    idx = torch.tensor([context], dtype=torch.long, device=model.embed_in.weight.device)
    decode = lambda ids: safe_decode(tok, ids)  # noqa: E731
    streaming = num_samples == 1 if stream is None else stream  # by default a single sample streams
    printer = TextStream(decode, prompt) if streaming else None
    if printer:
        printer.write(decode(prompt))
    passes, stop = [], None  # the prompt's Jacobi passes, when they run until its thoughts settle
    if jacobi_tol is not None:
        settle = settled(jacobi_tol)
        stop = lambda r, z, h: passes.append(r) or settle(r, z, h)  # noqa: E731
    if device_type == 'cuda':
        torch.cuda.synchronize()
    t0, new = time.perf_counter(), []
    with ctx:
        for idx_next, _ in generate_stream(model, idx, max_new_tokens, temperature, top_k or None,
                                           top_p if top_p < 1 else None, use_cache, n_jacobi, stop):
            new.append(idx_next.item())  # (.item() waits for the GPU: the timing needs no other sync)
            if printer:
                printer.add(new[-1])
    seconds = time.perf_counter() - t0
    if passes:
        print(f"note: the prompt's thoughts took {passes[-1]} Jacobi passes to settle to jacobi_tol={jacobi_tol:g}",
              file=sys.stderr)
    if printer:
        printer.finish()
    else:
        print(decode(prompt + new))
    if lens:
        with ctx:
            lines = sample_lines(model, context + new, len(context), decode)
        print('\n'.join(lines), file=sys.stderr, flush=True)
    return new, seconds


def main():
    check_options()
    dev = resolve_device(device)
    device_type = torch.device(dev).type
    ctx = autocast(device_type, resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    model, ckpt, source = load_init_from(init_from, out_dir, patch_method=patch_method)
    tok = model_tokenizer(source, ckpt, tokenizer, model.config.vocab_size)
    prompt = encode_prompt(tok, read_prompt(), model.config)
    model.think_threshold = float(think_threshold)
    if think_threshold < 1 and not model.config.n_thoughts:
        print(f"note: think_threshold: a {model.config.method_label} model has no thoughts to skip", file=sys.stderr)
    elif think_threshold < 1 and not use_cache:
        raise UserError("think_threshold < 1 decodes through the KV cache: drop --use_cache=False")
    if lens and len(pass_names(model.config)) == 1:
        print(f"note: a {model.config.method_label} model reads each token once: the lens shows one pass",
              file=sys.stderr)
    kernels.install(model.eval().to(dev))  # faster attention where it suits (nanoponder/kernels.py)
    if compile:  # the layer stack, which every path of every method runs; dynamic: the lengths change each call
        model.blocks = torch.compile(model.blocks, dynamic=True)
    tokens, seconds = [], 0.0
    for k in range(num_samples):
        if k:
            print('---------------')
        new, took = generate_one(model, prompt, tok, ctx, device_type)
        tokens, seconds = tokens + new, seconds + took
    unknown = sum(i >= tok.vocab_size for i in tokens)
    if unknown:
        print(f"note: {unknown} sampled id(s) were beyond the tokenizer's {tok.vocab_size} ids (the model's padded "
              f"vocabulary) and are left out of the text", file=sys.stderr)
    print(f"generated {len(tokens)} tokens in {seconds:.2f} s: {len(tokens) / max(seconds, 1e-9):.1f} tokens/s",
          file=sys.stderr)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
