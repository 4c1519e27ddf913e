"""
Speed and memory of the methods (vanilla GPT-NeoX, PonderLM-2, PonderLM and the baselines Pause, Loop and Hidden)
on this machine: training steps (forward + backward + AdamW) and batch-1 greedy decoding with and without the KV
cache, as a markdown table.

    python experiments/bench.py                                   # pythia-70m, every method, best device
    python experiments/bench.py --model=pythia-160m --batch_size=8 --block_size=1024 --json=out/bench.json
    python experiments/bench.py --model=pythia-14m --block_size=256 --batch_size=4 --new_tokens=64 \
        --new_tokens_uncached=8 --warmup=1 --repeats=3        # a few minutes on a small CPU
    python experiments/bench.py --methods=vanilla,ponderlm2-k1 --warmup=3 --repeats=10
    python experiments/bench.py --methods=vanilla,ponderlm2-k1,pause-k1,loop-k1,hidden-n1  # the thought vs compute
    python experiments/bench.py --model= --n_layer=2 --n_head=2 --n_embd=32 --vocab_size=128  # explicit dims
    python experiments/bench.py --model=pythia-14m --task=ponderlm2-k1:main   # one measurement: `result: {...}`
    python experiments/bench.py --model= --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=4 \
        --methods=vanilla,ponderlm2-k1 --dtype=bfloat16 --profile=True   # + torch.profiler's top ops per method
    python experiments/bench.py --model= --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=4 \
        --methods=ponderlm2-k1 --dtype=bfloat16 --grad_passes=1,2 --compare_compile=False  # truncated backprop
    python experiments/bench.py --model= --n_layer=6 --n_head=4 --n_embd=128 --vocab_size=512 --block_size=128 \
        --batch_size=16 --new_tokens=64 --methods=ponderlm2-k1 --thought_dropout=0.3 --grad_passes= \
        --compare_compile=False --compare_checkpointing=False --check_memory=False --threads=1 --repeats=7 \
        --compare_hf=False --dtype=float32   # thought dropout's index map, on the CPU experiment's shape

Methods (model.py's names): vanilla; ponderlm2-kK = PonderLM-2 with K latent thoughts per token, trained
with R = n_jacobi Jacobi passes (fixed, so every step costs the same); ponderlm1-nN = PonderLM with N
pondering steps; pause-kK = K pause slots after every token; loop-kK = the layer stack run K more times with
the same weights; hidden-nN = N steps that feed the hidden state back. Every (method, variant) is measured in
its own child process, bench.py run again with the whole config on its command line plus --task=method:variant,
so its peak memory is its own and not the high-water mark of the methods before it. Variants: main (training
and decoding), compile (each Block compiled, as train.py's compile=True), checkpoint (activation checkpointing),
memory (the memory plan of a training step against its measured peak, with and without checkpointing), gG
(PonderLM-2 backpropagating through its last G passes only, train.py's jacobi_grad_passes), td (PonderLM-2
with train.py's thought_dropout, a pattern drawn once) and sdpa
(on CUDA when flash_attn imports: flash-attn vs SDPA), and hf (vanilla's decoding against Hugging Face's
GPTNeoXForCausalLM.generate on the same weights, alternating in one process, when transformers imports). On a CPU,
compiling costs about a minute per method: --compare_compile=False.

Speed is judged against this machine's own limit: the best FLOP/s of a square matmul in the run's dtype, measured
again in each method's process right after its steps (a shared machine's speed drifts over minutes), next to each
step's FLOPs (flops_per_token). MFU is against a known GPU's datasheet peak, else against the measured peak that
train.py's log uses too (nanoponder.cost.matmul_peak, measured once per machine and cached).
"""
import dataclasses
import json as jsonlib  # `json` is the config key for the output path
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script, this file's folder is on the path, not the repository's modules
from configurator import known_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from nanoponder import kernels  # noqa: E402
from nanoponder.cost import (cpu_name, estimate_mfu, flops_per_token, matmul_peak, measure_matmul_peak,  # noqa: E402
                             measure_training_peak, mfu_peak, plan_memory)
from nanoponder.methods import method_fields  # noqa: E402
from nanoponder.runtime import (UserError, autocast, check_output_file, check_seed, compile_blocks,  # noqa: E402
                                failure, keep_freed_memory, note_emulated_bf16, resolve_device, resolve_dtype,
                                run_cli, write_json)

# -----------------------------------------------------------------------------
# model
model = 'pythia-70m'  # a Pythia size (as train.py's model=), or '' for the explicit n_layer / n_head / n_embd
n_layer = 0  # 0 -> the preset's; > 0 overrides it (needed with model=''), as train.py's
n_head = 0  # likewise
n_embd = 0  # likewise
vocab_size = 50304  # Pythia's padded vocabulary
block_size = 1024  # training sequence length
batch_size = 8  # training sequences per step
methods = 'vanilla,ponderlm2-k1,ponderlm2-k2,ponderlm1-n3,pause-k1,loop-k1,hidden-n1'  # comma-separated (model.py)
n_jacobi = 3  # PonderLM-2's R in training; fixed here, where train.py draws it from a range
# decoding, batch 1, greedy
prompt_len = 32  # prompt tokens
new_tokens = 256  # with the KV cache
new_tokens_uncached = 32  # without it every step recomputes the sequence (PonderLM-2: with exact thoughts)
# measurement
warmup = 2  # untimed runs of each measurement first
repeats = 5  # timed runs: the table gives their median and spread
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'float32', 'bfloat16' or 'float16' (CUDA) autocast; auto: bf16 where CUDA has it, else fp32
threads = 0  # CPU threads for torch, 0 = its default; 1 avoids thrashing when other jobs share the cores
compare_compile = True  # also time the training step with each Block torch.compile'd (train.py's compile=True)
compare_checkpointing = True  # also time it with activation checkpointing (train.py's activation_checkpointing)
check_memory = True  # also check the memory plan of a training step against its measured peak
grad_passes = '1,2'  # PonderLM-2: also the training step backpropagating through the last G passes only, each G
thought_dropout = 0.0  # PonderLM-2: also the training step with this thought dropout (train.py's); 0 = not measured
compare_attention = True  # CUDA only, with flash_attn installed: also time training with SDPA
compare_hf = True  # also time Hugging Face's generate on vanilla's weights (needs transformers)
profile = False  # also profile one training step per method (torch.profiler): top ops and the matmul share
peak_seconds = 1.0  # each method's matmul peak is measured again this long right after its timed steps
seed = 1337  # of the random weights and inputs
json = ''  # path for every figure as JSON
task = ''  # internal: 'method:variant' makes this process the child that measures that one thing
CONFIG_KEYS = list(known_config(globals()))
# -----------------------------------------------------------------------------

VARIANTS = ('main', 'compile', 'sdpa', 'checkpoint', 'memory', 'hf', 'td')
# the memory child's malloc returns large freed blocks at once, so that a CPU's peak RSS is the peak of live memory
MEMORY_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536'}


def parse_methods(text):
    names = [m.strip().lower() for m in text.split(',') if m.strip()]
    if not names:
        raise UserError("methods is empty; e.g. --methods=vanilla,ponderlm2-k1")
    for name in names:
        check_method(name)
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def check_method(name):
    try:
        method_fields(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def method_config(name):
    """The GPTConfig of the method `name` (model.py's names) at the benchmark's shape."""
    # the pause vector's row: the last one, which every vocab_size has (on random tokens, any row times the same)
    shape = {k: globals()[k] for k in ('n_layer', 'n_head', 'n_embd') if globals()[k]}  # (0: the preset's)
    overrides = dict(block_size=block_size, vocab_size=vocab_size, n_jacobi=n_jacobi, pause_token_id=vocab_size - 1,
                     **method_fields(name), **shape)
    try:
        if model:
            return GPTConfig.preset(model, **overrides)
        return GPTConfig(**overrides)
    except ValueError as e:  # unknown preset, n_embd not divisible by n_head, ...
        raise UserError(str(e)) from None


def parse_grad_passes():
    """grad_passes '1,2' -> [1, 2], checked."""
    text = str(grad_passes).strip('()')
    values = [v.strip() for v in text.split(',') if v.strip()]
    if not all(v.isdigit() and int(v) >= 1 for v in values):
        raise UserError(f"grad_passes must be whole numbers >= 1, comma-separated (e.g. 1,2), or '', got {grad_passes!r}")
    return [int(v) for v in values]


def check_config():
    """Everything the children would trip over, checked once up front. Returns the method names."""
    names = parse_methods(methods)
    parse_grad_passes()
    if not (isinstance(thought_dropout, (int, float)) and 0 <= thought_dropout < 1):
        raise UserError(f"thought_dropout must be a probability in [0, 1), got {thought_dropout!r}")
    # the model's shape keys too (0: the preset's): torch's words for a zero or negative size come late, from a child
    for key in ('n_layer', 'n_head', 'n_embd'):
        if globals()[key] < (0 if model else 1):
            why = "(0: the preset's)" if model else "(model='' takes the shape from them)"
            raise UserError(f"{key} must be >= {0 if model else 1}, got {globals()[key]} {why}")
    for key in ('vocab_size', 'block_size', 'batch_size', 'repeats', 'prompt_len', 'new_tokens',
                'new_tokens_uncached'):
        if globals()[key] < 1:
            raise UserError(f"{key} must be >= 1, got {globals()[key]}")
    if not peak_seconds > 0:
        raise UserError(f"peak_seconds must be > 0, got {peak_seconds}")
    if not peak_seconds < 3600:  # (inf would run every child forever)
        raise UserError(f"peak_seconds must be < 3600 (an hour per method), got {peak_seconds}")
    check_seed(seed)
    for key in ('warmup', 'n_jacobi', 'threads'):
        if globals()[key] < 0:
            raise UserError(f"{key} must be >= 0, got {globals()[key]}")
    if prompt_len + max(new_tokens, new_tokens_uncached) > block_size:
        raise UserError(f"prompt_len ({prompt_len}) + new_tokens ({max(new_tokens, new_tokens_uncached)}) "
                        f"exceeds block_size {block_size}")
    for name in names:
        method_config(name)
    return names


def device_and_dtype():
    """(device, device_type, torch dtype), by nanoponder.runtime's rules for 'auto' (those of every script)."""
    dev = resolve_device(device)
    device_type = torch.device(dev).type
    return dev, device_type, resolve_dtype(dtype, device_type)


def dtype_name(ptdtype):
    return str(ptdtype).removeprefix('torch.')


# -----------------------------------------------------------------------------
# the child: measure one (method, variant) and print its figures as one `result: {...}` line


def sync(device_type):
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def timed(fn, device_type):
    """Seconds per call of fn over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device_type)
        t0 = time.perf_counter()
        fn()
        sync(device_type)
        times.append(time.perf_counter() - t0)
    return times


def rss_mib():
    """This process's peak resident set size so far (a high-water mark; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10


def parse_task(text):
    """'method:variant' -> (method, variant), checked."""
    name, _, variant = text.partition(':')
    if variant not in VARIANTS and not (variant[:1] == 'g' and variant[1:].isdigit()):
        raise UserError(f"task must be method:variant with variant one of {', '.join(VARIANTS)} or gG (G >= 1), "
                        f"got {text!r}")
    check_method(name)
    return name, variant


def measure(name, variant):
    """The figures of one method: training (every variant) and decoding (main only)."""
    if threads:
        torch.set_num_threads(threads)
    dev, device_type, ptdtype = device_and_dtype()
    ctx = autocast(device_type, ptdtype)
    torch.manual_seed(seed)
    if variant == 'memory':
        return measure_memory(name, dev, ptdtype)
    if variant == 'hf':
        return measure_hf_decoding(dev)
    base_mib = rss_mib()  # torch and CUDA runtime, before the model exists
    gpt = kernels.install(GPT(method_config(name)).to(dev))  # as every script runs it
    if variant == 'sdpa':
        kernels.set_backend(gpt, 'sdpa')  # 'auto' (main) runs flash-attn where it can
    gpt.activation_checkpointing = variant == 'checkpoint'
    gpt.jacobi_grad_passes = int(variant[1:]) if variant[:1] == 'g' else 0  # g1, g2: truncated backpropagation
    if variant == 'compile':
        compile_blocks(gpt)  # per Block, as train.py: the same graphs for every R
    result = measure_training(gpt, variant, ctx, dev, ptdtype)
    if device_type != 'cuda':
        result['base_mem_mib'] = base_mib
    if variant == 'main':
        # the share of the peak is judged against the machine as it is now: a shared VM's speed drifts by 10-20%
        # over minutes, and matmul_peak is cached from another moment. (The peak memory is already recorded, so
        # this measurement's matrices do not count in it.)
        result['matmul_peak_now'] = measure_matmul_peak(dev, ptdtype, peak_seconds)
        if profile:
            result['profile'] = profile_training(gpt, ctx, dev)
        result.update(measure_decoding(gpt, ctx, dev))
    return result


def measure_training(gpt, variant, ctx, dev, ptdtype):
    device_type = torch.device(dev).type
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    kept = None
    if variant == 'td':  # one pattern for every step: the index map's cost does not depend on which
        from train import thought_pattern
        kept = thought_pattern(seed, 0, 0, (batch_size, block_size), gpt.config.n_thoughts, thought_dropout).to(dev)
    train_step = training_step(gpt, ctx, dev, kept)
    result = {}
    gpt.train()
    if variant == 'compile':  # the first call compiles: time it apart, it is not a training step
        sync(device_type)
        t0 = time.perf_counter()
        train_step()
        sync(device_type)
        result['compile_s'] = time.perf_counter() - t0
    result['step_s'] = timed(train_step, device_type)
    if device_type == 'cuda':
        result['peak_mem_mib'] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result['peak_mem_mib'] = rss_mib()
    G = gpt.jacobi_grad_passes
    result['flops_per_token'] = flops_per_token(gpt.config, n_jacobi, training=True, grad_passes=G)
    tokens_per_s = batch_size * block_size / statistics.median(result['step_s'])
    result['mfu'] = estimate_mfu(gpt.config, tokens_per_s, n_jacobi, mfu_peak(dev, ptdtype), G)
    return result  # the optimizer's state goes with it: decoding runs without


def training_step(gpt, ctx, dev, kept=None):
    """One training step of gpt on random tokens (forward + backward + AdamW), as train.py takes it; kept: the
    thought-dropout pattern (B, T)."""
    device_type = torch.device(dev).type
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-4, fused=device_type in ('cuda', 'cpu'))
    data = torch.randint(vocab_size, (batch_size, block_size + 1), device=dev)
    x, y = data[:, :-1], data[:, 1:]

    def train_step():
        with ctx:
            _, loss = gpt(x, y, n_jacobi=n_jacobi, kept=kept)  # n_jacobi, kept: PonderLM-2's only
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step


# the in-place ones: kernels.attend_blocks' backward accumulates with baddbmm_, which runs addmm_ per matrix on a CPU
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::baddbmm_', 'aten::addmm_')


def profile_training(gpt, ctx, dev):
    """torch.profiler over one training step (after a warm-up one): the share of the ops' self time that the
    matmuls take, and the table of the top ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device_type = torch.device(dev).type
    step = training_step(gpt, ctx, dev)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        step()
        sync(device_type)
    ops = prof.key_averages()
    key = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    total = sum(getattr(e, key) for e in ops)
    matmul = sum(getattr(e, key) for e in ops if e.key in MATMUL_OPS)
    return {'matmul_share': matmul / total if total else None, 'table': ops.table(sort_by=key, row_limit=15)}


def measure_memory(name, dev, ptdtype):
    """The memory plan of one training step next to its measured peak (the CUDA allocator's, or the peak RSS
    rise on a CPU), without and with activation checkpointing; MiB."""
    config = method_config(name)
    result = {}
    for key, checkpointing in (('plain', False), ('checkpointing', True)):
        plan = plan_memory(config, batch_size, block_size, n_jacobi=n_jacobi, dtype=ptdtype,
                           activation_checkpointing=checkpointing, device_type=torch.device(dev).type)
        measured = measure_training_peak(config, batch_size, block_size, n_jacobi=n_jacobi, dtype=ptdtype, device=dev,
                                         activation_checkpointing=checkpointing)
        result[key] = {'plan_mib': plan.total / 2**20, 'measured_mib': None if measured is None else measured / 2**20}
    return result


def measure_hf_decoding(dev):
    """Cached greedy decoding of vanilla here and of Hugging Face's GPTNeoXForCausalLM.generate on the same random
    weights (the model that HF computes: no embedding scale), alternating in this one process; tokens/s each."""
    try:
        import transformers
    except ImportError:
        return {'error': 'transformers is not installed'}
    from nanoponder.hf import hf_config
    gpt = GPT(dataclasses.replace(method_config('vanilla'), scale_embeds=False))
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf_config(gpt.config)))
    with torch.no_grad():  # the same module names under gpt_neox., and the head (embed_out or lm_head by version)
        for key, p in gpt.state_dict().items():
            target = hf.get_output_embeddings().weight if key == 'embed_out.weight' else hf.gpt_neox.get_parameter(key)
            target.copy_(p)
    gpt, hf = kernels.install(gpt.to(dev).eval()), hf.to(dev).eval()
    device_type = torch.device(dev).type
    ctx = autocast(device_type, device_and_dtype()[2])
    prompt = torch.randint(vocab_size, (1, prompt_len), device=dev)
    runs = {'ours': lambda: gpt.generate(prompt, new_tokens, temperature=0),
            'hf': lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)}
    result = {name: [] for name in runs}
    with ctx, torch.no_grad():
        same = torch.equal(runs['ours'](), runs['hf']())
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                sync(device_type)
                t0 = time.perf_counter()
                fn()
                sync(device_type)
                result[name].append(new_tokens / (time.perf_counter() - t0))
    result['same_tokens'] = same
    return result


def measure_decoding(gpt, ctx, dev):
    """Tokens per second, batch 1, greedy, with and without the KV cache; the time includes the prefill."""
    device_type = torch.device(dev).type
    gpt.eval()
    prompt = torch.randint(vocab_size, (1, prompt_len), device=dev)
    result = {}
    for use_cache, n_new in (('cached', new_tokens), ('uncached', new_tokens_uncached)):
        def generate():
            with ctx:
                gpt.generate(prompt, n_new, temperature=0, use_cache=use_cache == 'cached')
        result[use_cache] = [n_new / t for t in timed(generate, device_type)]
    return result


def child_main():
    name, variant = parse_task(task)
    check_config()
    # as train.py, in this measuring process only (not in a test that calls measure), and not in the memory
    # child (MEMORY_ENV sets a MALLOC_ variable)
    keep_freed_memory(device_and_dtype()[1])
    try:
        result = measure(name, variant)
    except torch.cuda.OutOfMemoryError:  # CUDA says so; a CPU child is SIGKILLed instead
        result = {'error': 'out of memory'}
    print('result: ' + jsonlib.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# the parent: run the children, print the tables, write the JSON


def child_command(name, variant):
    """This script with the whole current config spelled out (so config files and defaults reach the child
    as they are here) and the one task to measure."""
    config = [f'--{k}={globals()[k]!r}' for k in CONFIG_KEYS if k not in ('task', 'json')]
    return [sys.executable, os.path.abspath(__file__), *config, f'--task={name}:{variant}']


def run_child(name, variant):
    print(f"measuring {name} ({variant}) ...", file=sys.stderr, flush=True)
    env = {**os.environ, **MEMORY_ENV} if variant == 'memory' else None
    proc = subprocess.run(child_command(name, variant), capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('result: '):
            return jsonlib.loads(line[len('result: '):])
    # no result: it crashed or was killed (a CPU out of memory is SIGKILL); keep going with the others
    why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (out of memory?)"
    print(f"warning: {name} ({variant}) failed: {why}", file=sys.stderr, flush=True)
    return {'error': why}


def stats(samples):
    return {'median': statistics.median(samples), 'min': min(samples), 'max': max(samples), 'samples': samples}


def training_speed(step_s):
    """Tokens per second of each timed training step, as stats."""
    return stats([batch_size * block_size / t for t in step_s])


def ratio(a, b):
    return a / b if a is not None and b else None


def machine_info(dev, device_type, ptdtype):
    if device_type == 'cuda':
        name = torch.cuda.get_device_name(dev)
        extra = f"CUDA {torch.version.cuda}"
    else:
        name = cpu_name()
        extra = f"{os.cpu_count()} cores"
    return {'device': dev, 'name': name, 'detail': extra, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'dtype': dtype_name(ptdtype),
            'matmul_peak_flops': matmul_peak(dev, ptdtype), 'mfu_peak_flops': mfu_peak(dev, ptdtype)}


def attention_kernel(device_type, ptdtype):
    """What the main runs attend with (the kernels' 'auto'): 'flash-attn' (then SDPA is the comparison),
    'blocks' (kernels.attend_blocks up to kernels.BLOCKS_MAX_LEN positions, SDPA beyond) or 'sdpa'."""
    if kernels.flash_suits(device_type, ptdtype):
        return 'flash-attn'
    return 'blocks' if kernels.blocks_suit(device_type, ptdtype, block_size) else 'sdpa'


ATTENTION_NOTES = {
    'flash-attn': "eager uses flash-attn",
    'blocks': f"eager uses attend_blocks (a CPU) up to {kernels.BLOCKS_MAX_LEN} positions, SDPA beyond",
    'sdpa': "eager uses SDPA (flash_attn not installed or not CUDA, fp32 on CUDA, or over "
            f"{kernels.BLOCKS_MAX_LEN} positions on a CPU)"}


def collect(names, device_type, ptdtype):
    """Run every child and arrange the figures per method, with ratios to vanilla. Also returns the main runs'
    attention kernel (attention_kernel)."""
    attention = attention_kernel(device_type, ptdtype)
    flash = attention == 'flash-attn'
    out = {}
    for name in names:
        r = run_child(name, 'main')
        entry = out[name] = {'label': method_config(name).method_label}
        if 'error' in r:
            entry['error'] = r['error']
            continue
        step_flops = r['flops_per_token'] * batch_size * block_size
        train = entry['train'] = {'step_s': stats(r['step_s']),
                                  'tokens_per_s': training_speed(r['step_s']),
                                  'peak_mem_mib': r['peak_mem_mib'], 'mfu': r['mfu'],
                                  'flops_per_token': r['flops_per_token'], 'flops_per_step': step_flops,
                                  'flops_per_s': step_flops / statistics.median(r['step_s']),
                                  'matmul_peak_now': r['matmul_peak_now']}
        train['matmul_peak_share'] = train['flops_per_s'] / r['matmul_peak_now']
        if 'profile' in r:
            entry['profile'] = r['profile']
        if 'base_mem_mib' in r:
            train['base_mem_mib'] = r['base_mem_mib']
        entry['decode'] = {'cached': {'new_tokens': new_tokens, 'tokens_per_s': stats(r['cached'])},
                           'uncached': {'new_tokens': new_tokens_uncached, 'tokens_per_s': stats(r['uncached'])}}
        if compare_compile:
            c = run_child(name, 'compile')
            entry['compile'] = c if 'error' in c else {
                'compile_s': c['compile_s'], 'peak_mem_mib': c['peak_mem_mib'],
                'tokens_per_s': training_speed(c['step_s'])}
        if compare_checkpointing:
            k = run_child(name, 'checkpoint')
            entry['checkpoint'] = k if 'error' in k else {
                'peak_mem_mib': k['peak_mem_mib'], **({'base_mem_mib': k['base_mem_mib']} if 'base_mem_mib' in k else {}),
                'tokens_per_s': training_speed(k['step_s'])}
        if check_memory:
            entry['memory'] = run_child(name, 'memory')
        if method_config(name).n_thoughts:
            for G in parse_grad_passes():
                g = run_child(name, f'g{G}')
                entry.setdefault('grad_passes', {})[G] = g if 'error' in g else {
                    'tokens_per_s': training_speed(g['step_s']), 'peak_mem_mib': g['peak_mem_mib'],
                    **({'base_mem_mib': g['base_mem_mib']} if 'base_mem_mib' in g else {}),
                    'flops_per_token': g['flops_per_token']}
        if method_config(name).n_thoughts and thought_dropout:
            d = run_child(name, 'td')
            entry['td'] = d if 'error' in d else {
                'tokens_per_s': training_speed(d['step_s']), 'peak_mem_mib': d['peak_mem_mib'],
                **({'base_mem_mib': d['base_mem_mib']} if 'base_mem_mib' in d else {})}
        if flash and compare_attention:
            s = run_child(name, 'sdpa')
            entry['sdpa'] = s if 'error' in s else {'tokens_per_s': training_speed(s['step_s'])}
        if name == 'vanilla' and compare_hf:
            h = run_child(name, 'hf')
            entry['hf'] = h if 'error' in h else {
                'ours_tokens_per_s': stats(h['ours']), 'hf_tokens_per_s': stats(h['hf']),
                'same_tokens': h['same_tokens'], 'speedup': ratio(statistics.median(h['ours']), statistics.median(h['hf']))}
    add_ratios(out)
    return out, attention


def add_ratios(out):
    base = out.get('vanilla', {})
    if 'train' not in base:
        base = None  # no vanilla to compare with: the ratio columns say n/a
    for entry in out.values():
        if 'train' not in entry:
            continue
        t = entry['train']
        t['time_vs_vanilla'] = ratio(t['step_s']['median'], base and base['train']['step_s']['median'])
        t['flops_vs_vanilla'] = ratio(t['flops_per_token'], base and base['train']['flops_per_token'])
        # 1.0 = the method costs exactly its extra FLOPs; above 1 it runs them less efficiently than vanilla
        t['overhead'] = ratio(t['time_vs_vanilla'], t['flops_vs_vanilla'])
        for mode, d in entry['decode'].items():
            d['vs_vanilla'] = ratio(d['tokens_per_s']['median'],
                                    base and base['decode'][mode]['tokens_per_s']['median'])
        main_tps = t['tokens_per_s']['median']
        if 'tokens_per_s' in entry.get('compile', {}):
            entry['compile']['speedup'] = ratio(entry['compile']['tokens_per_s']['median'], main_tps)
        if 'tokens_per_s' in entry.get('checkpoint', {}):
            k = entry['checkpoint']
            k['time_vs_plain'] = ratio(main_tps, k['tokens_per_s']['median'])
            k['memory_vs_plain'] = ratio(memory_rise(k), memory_rise(t))
        for part in entry.get('memory', {}).values():
            if isinstance(part, dict):
                part['measured_vs_plan'] = ratio(part['measured_mib'], part['plan_mib'])
        if 'tokens_per_s' in entry.get('sdpa', {}):
            entry['sdpa']['flash_speedup'] = ratio(main_tps, entry['sdpa']['tokens_per_s']['median'])


def memory_rise(train):
    """Peak memory of a training measurement: on a CPU its rise over the torch runtime (peak RSS - base)."""
    return train['peak_mem_mib'] - train.get('base_mem_mib', 0)


def num(x):
    if x is None:
        return 'n/a'
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def spread(s, scale=1.0):
    return f"{num(s['median'] * scale)} ({num(s['min'] * scale)}-{num(s['max'] * scale)})"


def times(x):
    return 'n/a' if x is None else f"{x:.2f}x"


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def report(info, out, attention):
    cuda = info['device'].startswith('cuda')
    dims = method_config('vanilla')
    size = model or 'custom'
    print(f"machine: {info['name']} ({info['detail']}) | torch {info['torch']} | threads {info['threads']} | "
          f"{info['device']} {info['dtype']} | matmul peak {num(info['matmul_peak_flops'] / 1e9)} GFLOP/s")
    print(f"model: {size} ({dims.n_layer} layers, {dims.n_head} heads, {dims.n_embd} embd, vocab "
          f"{dims.vocab_size}) | batch {batch_size} x {block_size} tokens | PonderLM-2 R={n_jacobi} | "
          f"warmup {warmup}, repeats {repeats} | median (min-max)")
    print()
    print("## training: forward + backward + AdamW step")
    print()
    rows = []
    for entry in out.values():
        if 'error' in entry:
            rows.append([entry['label'], f"failed: {entry['error']}"] + ['-'] * 9)
            continue
        t = entry['train']
        mem = num(t['peak_mem_mib'])
        if 'base_mem_mib' in t:
            mem += f" (+{num(t['peak_mem_mib'] - t['base_mem_mib'])})"
        mfu = 'n/a' if t['mfu'] is None else f"{100 * t['mfu']:.1f}%"
        rows.append([entry['label'], spread(t['step_s'], 1000), spread(t['tokens_per_s']), num(t['flops_per_step'] / 1e9),
                     num(t['flops_per_s'] / 1e9), f"{100 * t['matmul_peak_share']:.0f}%", mfu, mem,
                     times(t['time_vs_vanilla']), times(t['flops_vs_vanilla']), times(t['overhead'])])
    print(table(['method', 'step ms', 'tokens/s', 'GFLOP/step', 'GFLOP/s', 'of matmul peak', 'MFU', 'peak mem MiB',
                 'time vs vanilla', 'FLOPs vs vanilla', 'overhead'], rows))
    print()
    nows = ', '.join(num(e['train']['matmul_peak_now'] / 1e9) for e in out.values() if 'train' in e)
    print(f"GFLOP/step: flops_per_token x {batch_size * block_size} tokens (matmuls, attention over the full "
          f"context); of matmul peak: GFLOP/s / this machine's best {info['dtype']} matmul, measured in the "
          f"method's process right after its steps ({nows} GFLOP/s); MFU: against "
          + ("the GPU's datasheet peak." if cuda and info['mfu_peak_flops'] != info['matmul_peak_flops'] else
             f"the cached measured peak of the machine line ({num(info['matmul_peak_flops'] / 1e9)} GFLOP/s)."))
    if cuda:
        print("peak mem: torch.cuda.max_memory_allocated (weights, grads, AdamW state, activations).")
    else:
        print("peak mem: the measuring process's peak RSS; in parentheses its rise over the torch runtime "
              "(weights, grads, AdamW state, activations).")
    print("overhead: time vs vanilla / FLOPs vs vanilla (1.00x = the extra FLOPs run as fast as vanilla's).")
    print()
    print(f"## decoding: batch 1, {prompt_len}-token prompt, greedy, prefill included")
    print()
    rows = []
    for entry in out.values():
        if 'error' in entry:
            rows.append([entry['label']] + ['-'] * 4)
            continue
        c, u = entry['decode']['cached'], entry['decode']['uncached']
        rows.append([entry['label'], spread(c['tokens_per_s']), times(c['vs_vanilla']),
                     spread(u['tokens_per_s']), times(u['vs_vanilla'])])
    print(table(['method', f'KV cache tokens/s ({new_tokens} new)', 'vs vanilla',
                 f'no cache tokens/s ({new_tokens_uncached} new)', 'vs vanilla'], rows))
    print()
    print(f"no cache: every step recomputes the whole sequence (PonderLM-2 with exact thoughts), so only "
          f"{new_tokens_uncached} new tokens. With the cache, PonderLM-2 K=1 runs the trunk twice per token and "
          f"the head once: about 0.5x vanilla where the trunk's weights dominate, more where the head's do.")
    h = out.get('vanilla', {}).get('hf')
    if h is not None:
        print()
        if 'error' in h:
            print(f"Hugging Face generate: not measured ({h['error']})")
        else:
            print(f"Hugging Face generate (GPTNeoXForCausalLM, vanilla's weights, {new_tokens} new, alternating with "
                  f"ours in one process): {spread(h['hf_tokens_per_s'])} tokens/s; ours {spread(h['ours_tokens_per_s'])}"
                  f" = {times(h['speedup'])}; the same tokens: {'yes' if h['same_tokens'] else 'NO'}")
    for entry in out.values():
        if 'profile' in entry:
            share = entry['profile']['matmul_share']
            print()
            print(f"## profile of one training step: {entry['label']} (matmuls "
                  f"{'n/a' if share is None else f'{100 * share:.0f}%'} of the ops' self time)")
            print()
            print(entry['profile']['table'])
    variants(out, attention)
    if check_memory:
        memory_table(out, cuda)
    grad_passes_table(out)
    thought_dropout_table(out)


def variants(out, attention):
    """The training step compiled, with activation checkpointing, and with SDPA instead of flash-attn."""
    sdpa = attention == 'flash-attn' and compare_attention
    if not (compare_compile or compare_checkpointing or sdpa):
        return
    print()
    print("## training variants: compiled Blocks, activation checkpointing" + (", attention kernel" if sdpa else ''))
    print()
    header, rows = ['method', 'eager tokens/s'], []
    if compare_compile:
        header += ['compiled tokens/s', 'compile speedup', 'compile s']
    if compare_checkpointing:
        header += ['checkpointed tokens/s', 'time vs eager', 'peak mem vs eager']
    if sdpa:
        header += ['SDPA tokens/s', 'flash-attn vs SDPA']
    for entry in out.values():
        if 'error' in entry:
            continue
        row = [entry['label'], num(entry['train']['tokens_per_s']['median'])]
        if compare_compile:
            c = entry['compile']
            row += ([f"failed: {c['error']}", '-', '-'] if 'error' in c else
                    [spread(c['tokens_per_s']), times(c['speedup']), num(c['compile_s'])])
        if compare_checkpointing:
            k = entry['checkpoint']
            row += ([f"failed: {k['error']}", '-', '-'] if 'error' in k else
                    [spread(k['tokens_per_s']), times(k['time_vs_plain']), times(k['memory_vs_plain'])])
        if sdpa:
            s = entry['sdpa']
            row += ([f"failed: {s['error']}", '-'] if 'error' in s else
                    [spread(s['tokens_per_s']), times(s['flash_speedup'])])
        rows.append(row)
    print(table(header, rows))
    print()
    print(ATTENTION_NOTES[attention])
    if compare_checkpointing:
        print("checkpointing: each Block recomputed in backward; peak mem as in the training table (its rise, on a CPU).")


def memory_table(out, cuda):
    print()
    print("## memory: the memory plan of a training step vs its measured peak")
    print()
    rows = []
    for entry in out.values():
        m = entry.get('memory', {})
        if 'error' in entry or 'error' in m:
            rows.append([entry['label'], f"failed: {entry.get('error') or m['error']}"] + ['-'] * 5)
            continue
        p, k = m['plain'], m['checkpointing']
        rows.append([entry['label'], num(p['plan_mib']), num(p['measured_mib']), times(p['measured_vs_plan']),
                     num(k['plan_mib']), num(k['measured_mib']), times(k['measured_vs_plan'])])
    print(table(['method', 'plan MiB', 'measured MiB', 'measured / plan', 'plan, checkpointing MiB',
                 'measured, checkpointing MiB', 'measured / plan'], rows))
    print()
    print("plan: weights, gradients, AdamW state and activations of one step (an estimate, eager mode). measured: "
          + ("torch.cuda.max_memory_allocated over the step." if cuda else
             "the rise of the peak RSS over a step, in a process whose malloc returns freed blocks at once."))


def grad_passes_table(out):
    """Truncated backpropagation against full (G = 0): the measured steps, then the memory plans of pythia-70m and
    pythia-1.4b K=1 at 2048 tokens (the configs' micro-batches, bf16, R up to 4)."""
    rows = []
    for entry in out.values():
        if 'error' in entry or not entry.get('grad_passes'):
            continue
        t = entry['train']
        rows.append([entry['label'], 'all (0)', spread(t['tokens_per_s']), '1.00x', num(t['flops_per_step'] / 1e9),
                     num(memory_rise(t)), '1.00x'])
        for G, g in entry['grad_passes'].items():
            rows.append([entry['label'], str(G)] + (['failed: ' + g['error']] + ['-'] * 4 if 'error' in g else [
                spread(g['tokens_per_s']), times(ratio(g['tokens_per_s']['median'], t['tokens_per_s']['median'])),
                num(g['flops_per_token'] * batch_size * block_size / 1e9), num(memory_rise(g)),
                times(ratio(memory_rise(g), memory_rise(t)))]))
    if rows:
        print()
        print("## truncated backpropagation: the last G passes with a graph (train.py's jacobi_grad_passes)")
        print()
        print(table(['method', 'G', 'tokens/s', 'speed vs all', 'GFLOP/step', 'peak mem MiB', 'mem vs all'], rows))
        print()
        print(f"PonderLM-2 at R={n_jacobi}: the stages and the first R+1-G passes run without a graph. peak mem as in "
              f"the training table (its rise, on a CPU).")
    rows = []
    for size, micro in (('pythia-70m', 8), ('pythia-1.4b', 1)):
        config = GPTConfig.preset(size, n_thoughts=1)
        plans = [plan_memory(config, micro, 2048, n_jacobi=4, dtype=torch.bfloat16, grad_passes=G) for G in (0, 1, 2)]
        rows += [[size, f"{micro} x 2048", str(G) if G else 'all (0)', f"{p.activations / 2**30:.1f}",
                  f"{p.total / 2**30:.1f}", times(p.activations / plans[0].activations)] for G, p in enumerate(plans)]
    print()
    print("## memory plans with truncated backpropagation: PonderLM-2 K=1, bf16, R up to 4, one process")
    print()
    print(table(['model', 'micro-batch', 'G', 'activations GiB', 'total GiB', 'activations vs all'], rows))


def thought_dropout_table(out):
    """The training step with thought dropout's index map against the one without."""
    rows = [[e['label'], spread(e['train']['tokens_per_s'])] + (['failed: ' + e['td']['error'], '-', '-', '-']
            if 'error' in e['td'] else [spread(e['td']['tokens_per_s']),
            times(ratio(e['td']['tokens_per_s']['median'], e['train']['tokens_per_s']['median'])),
            num(memory_rise(e['td'])), times(ratio(memory_rise(e['td']), memory_rise(e['train'])))])
            for e in out.values() if 'error' not in e and 'td' in e]
    if rows:
        print()
        print(f"## thought dropout {thought_dropout:g}: the training step with the keys' and values' index map")
        print()
        print(table(['method', 'tokens/s, every thought', 'tokens/s, dropout', 'speed vs every thought',
                     'peak mem MiB', 'mem vs every thought'], rows))


def failed(out):
    return [f"{name} ({variant})" for name, e in out.items()
            for variant, part in [('main', e)] + [(v, e.get(v, {})) for v in VARIANTS if v != 'main']
            + [(f'g{G}', g) for G, g in e.get('grad_passes', {}).items()]
            if 'error' in part]


def bench_all():
    names = check_config()
    if json:
        check_output_file(json, '--json')  # now, not after minutes of measuring
    dev, device_type, ptdtype = device_and_dtype()
    note_emulated_bf16(device_type, ptdtype)  # the children's autocast says it too, but their stderr is captured
    if threads:
        torch.set_num_threads(threads)  # the children do the same; here it is for the machine line
    info = machine_info(dev, device_type, ptdtype)
    out, attention = collect(names, device_type, ptdtype)
    report(info, out, attention)
    if json:
        config = {k: globals()[k] for k in CONFIG_KEYS if k != 'task'}
        config['shape'] = {k: getattr(method_config('vanilla'), k) for k in ('n_layer', 'n_head', 'n_embd')}
        config['method_settings'] = {name: method_fields(name) for name in names}
        config['attention'] = attention
        write_json(json, {'machine': info, 'config': config, 'methods': out})
        print(f"\nwrote {json}")
    if failed(out):
        raise failure(f"{len(failed(out))} measurement(s) failed: {', '.join(failed(out))} (see the warnings above)")


def main():
    if task:
        child_main()
    else:
        bench_all()


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    run_cli(main)
