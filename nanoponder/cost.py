"""
The cost of a run, from its config alone: parameters, FLOPs per token and MFU, and the memory plan (the bytes that
each process holds at the peak of a training iteration: weights, gradients, AdamW state and activations, for a
micro-batch, precision, parallelism and activation checkpointing). Everything here reads PonderLM-2's pass
schedule from one place, pass_schedule(), and takes the Jacobi passes R explicitly (the model's n_jacobi by default).

    from nanoponder.cost import flops_per_token, plan_memory
    config = GPTConfig.preset('pythia-1.4b', n_thoughts=1)
    flops_per_token(config, n_jacobi=3)                      # one training step, per token
    inference_flops_per_token(config)                        # decoding one token exactly through the KV cache
    plan = plan_memory(config, batch_size=1, n_jacobi=4, dtype=torch.bfloat16, parallelism='fsdp', world_size=16,
                       grad_accum=8, activation_checkpointing=True)
    print(plan.summary())

The plan counts what eager PyTorch's autograd saves, tensor by tensor (activation_bytes), not the allocator's
slack; measure_training_peak measures the real peak to compare it with.
"""
import json
import os
import platform
import time
from dataclasses import dataclass

import torch

from model import GPT, METHOD_COUNTS
from nanoponder import kernels
from nanoponder.runtime import atomic_write, autocast, cache_path, human_bytes

# dense bf16 peak TFLOP/s, looked up by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {'H200': 989, 'H100': 989, 'A100': 312, 'A10G': 125, 'A6000': 155, 'L40S': 362, 'L4': 121,
               '4090': 165, '3090': 71, 'V100': 125}


def count_params(config):
    """The parameters of GPT(config), from the config alone (no model is built): a 2.8B model is fine here.
    -> {'total', 'block': one Block's, 'matmul': the weight matrices of one Block (what its matmuls multiply by),
    'root': the embeddings' and the final LayerNorm's}."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    inner = config.n_inner or 4 * C
    matmul = 3 * C * C + C * C + C * inner + inner * C  # query_key_value, dense, the MLP's two
    block = matmul + 4 * C + 3 * C + C + inner + C  # + the 2 LayerNorms and the biases
    return {'total': 2 * V * C + L * block + 2 * C, 'block': block, 'matmul': matmul, 'root': 2 * V * C + 2 * C}


def pass_schedule(config, n_jacobi=None):
    """The trunk passes of one forward, as (slots per token, how many passes of that size): PonderLM-2 builds its
    stages (1..K slots), then runs R Jacobi passes and the final pass over K+1 slots; Pause one pass over K+1 slots;
    PonderLM and Hidden N+1 passes, Loop K+1 runs of the layer stack; vanilla one. n_jacobi: R (default
    config.n_jacobi; a mean R may be fractional for FLOPs)."""
    K = config.n_thoughts
    if K:
        R = config.n_jacobi if n_jacobi is None else n_jacobi
        return [(S, 1) for S in range(1, K + 1)] + [(K + 1, R + 1)]
    return [(config.slots, config.passes)]


def flops_per_token(config, n_jacobi=None, training=True, seq_len=None, grad_passes=0):
    """FLOPs per real token of one training step (forward + backward = 3x forward) or one eval forward, counting
    every trunk pass over its (slots x T) positions, the attention over that length, and the vocabulary
    projections. Matmuls only (2 FLOPs per multiply-add), as in the PaLM appendix. n_jacobi: R, see pass_schedule(),
    or a range (lo, hi): the mean over R drawn uniformly from lo..hi, as training draws it. grad_passes: PonderLM-2's
    G >= 1, backward (2x forward) through the last G passes and the head only."""
    if isinstance(n_jacobi, (tuple, list)):
        lo, hi = n_jacobi
        return sum(flops_per_token(config, R, training, seq_len, grad_passes) for R in range(lo, hi + 1)) / (hi - lo + 1)
    T = seq_len or config.block_size
    L, H, V = config.n_layer, config.n_embd, config.vocab_size
    trunk_params = L * count_params(config)['matmul']

    def slot_flops(context):  # one trunk position: weight matmuls + q.k and attn.v over the context
        return 2 * trunk_params + 4 * L * H * context

    head = 2 * H * V
    schedule = pass_schedule(config, n_jacobi)
    fwd = sum(count * S * slot_flops(S * T) for S, count in schedule) + head
    if config.n_ponder:  # N more vocabulary projections and N probability-weighted embedding sums
        fwd += 2 * config.n_ponder * head
    if not training:
        return fwd
    if not (grad_passes and config.n_thoughts):
        return 3 * fwd
    S, count = schedule[-1]  # the R+1 passes over K+1 slots, of which the last G build a graph
    return fwd + 2 * (min(grad_passes, count) * S * slot_flops(S * T) + head)


def inference_flops_per_token(config, position=None):
    """FLOPs of decoding one token exactly through the KV cache, what generate spends per new token, with `position`
    tokens before it (default: the mean over a block_size context, (block_size - 1) / 2). Each of the token's
    slots runs once through the trunk in every pass (PonderLM-2's thoughts and Pause's pauses are slots, the others
    run N+1 or K+1 passes over one slot, each pass with its own cache), and slot j attends to the position x slots
    cached before it and to the j + 1 slots of its own token up to itself. One vocabulary projection predicts the
    next token; PonderLM's N steps add N projections and N expected embeddings. Matmuls only, as flops_per_token."""
    t = (config.block_size - 1) / 2 if position is None else position
    L, H, V, S = config.n_layer, config.n_embd, config.vocab_size, config.slots
    trunk = 2 * L * count_params(config)['matmul']  # the weight matmuls of one slot through the layers
    one_pass = sum(trunk + 4 * L * H * (t * S + j + 1) for j in range(S))  # q.k and attn.v over the keys it sees
    head = 2 * H * V
    return config.n_caches * one_pass + head + 2 * config.n_ponder * head


def adaptive_flops_per_token(config, skipped, stopped, position=None):
    """inference_flops_per_token with adaptive thoughts: per token, `skipped` thought slots not computed (their keys
    and values copied) and `stopped` (0..1) whether it stopped early; each check made is one more vocabulary
    projection (a token that stops at its j-th check made j: K - skipped + stopped checks). The trunk's cost is
    spread evenly over the K+1 slots (attention differs a little between them)."""
    K, head = config.n_thoughts, 2 * config.n_embd * config.vocab_size
    full = inference_flops_per_token(config, position)
    return head + (full - head) * (K + 1 - skipped) / (K + 1) + (K - skipped + stopped) * head


def device_peak_flops():
    """The bf16 peak FLOP/s of the current CUDA device, from PEAK_TFLOPS; None when unknown (e.g. a CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def estimate_mfu(config, tokens_per_sec, n_jacobi=None, peak_flops=None, grad_passes=0):
    """Model FLOPs utilization of training at tokens_per_sec real tokens per second (of one device) with
    R = n_jacobi (or a range, see flops_per_token) and grad_passes, against peak_flops (see mfu_peak) or the bf16
    datasheet peak of the current CUDA device; None when neither is known."""
    peak_flops = peak_flops or device_peak_flops()
    if not peak_flops:
        return None
    return flops_per_token(config, n_jacobi, training=True, grad_passes=grad_passes) * tokens_per_sec / peak_flops


def mfu_peak(device, dtype):
    """The FLOP/s that MFU is reported against: a known GPU's datasheet bf16 peak (PEAK_TFLOPS, the usual MFU),
    else this machine's measured matmul peak in dtype (matmul_peak; a CPU has no datasheet figure that its two
    cores reach)."""
    if torch.device(device).type == 'cuda':
        return device_peak_flops() or matmul_peak(device, dtype)
    return matmul_peak(device, dtype)


def measure_matmul_peak(device='cpu', dtype=torch.float32, seconds=1.0):
    """The best FLOP/s of one square matmul in dtype on device (n = 2048 on a CPU, 8192 on a GPU) over about
    `seconds` of repeats: the practical limit of the machine's matrix units, which a model's big matmuls approach."""
    device = torch.device(device)
    n = 8192 if device.type == 'cuda' else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.mm(a, b)  # the first product pays for the kernel's setup
    best, start = float('inf'), time.perf_counter()
    while time.perf_counter() - start < seconds:
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def matmul_peak(device='cpu', dtype=torch.float32):
    """measure_matmul_peak, measured once per machine, device, dtype, thread count and torch version and kept in
    $XDG_CACHE_HOME/nanoponder/matmul_peak.json (~/.cache by default; delete the file to measure again, e.g. after
    it was measured on a busy machine). A cache that cannot be written is skipped."""
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    key = f"{platform.node()} | {name} | {device.type} | {str(dtype).removeprefix('torch.')} | " \
          f"{torch.get_num_threads()} threads | torch {torch.__version__}"
    path = cache_path('matmul_peak.json')
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure
        known = {}
    if not isinstance(known.get(key), (int, float)):
        known[key] = measure_matmul_peak(device, dtype)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_write(path, 'w') as f:
                json.dump(known, f, indent=2)
        except OSError:
            pass
    return float(known[key])


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown CPU'


def attention_probability_count(length, block=kernels.BLOCK):
    """The probabilities that kernels.attend_blocks keeps per head for `length` positions: each block of queries
    over the keys up to its last."""
    return sum(min(block, length - a) * min(a + block, length) for a in range(0, length, block))


def activation_bytes(config, batch_size, seq_len, dtype_bytes, checkpointing, n_jacobi=None, blocks=None,
                     grad_passes=0, thought_dropout=False):
    """-> (kept, working): the bytes that one micro-batch's forward keeps for backward, and the most that
    backward adds on top at once. Per slot and layer, in eager mode, autograd keeps the block input (fp32, the
    residual stream) and, in the compute dtype, the two LayerNorm outputs, q k v (3C, rotated in place),
    the attention output (and its log-sum-exp), the re-laid-out heads, and the MLP's hidden layer before and
    after GELU (2 x n_inner). With checkpointing only the block input stays; backward recomputes one block's
    insides at a time. The loss keeps the logits (in the compute dtype) for every token. blocks(length): whether
    attention over that many positions runs kernels.attend_blocks, which also keeps its probabilities.
    grad_passes: PonderLM-2's G >= 1 keeps the last G passes' activations only, and the passes without a graph add
    the peak of one of them (a block's insides over its slots). thought_dropout: PonderLM-2's keys and values
    copied through the skip map, which attention keeps too (2C per slot and layer)."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    inner = config.n_inner or 4 * C
    B, T = batch_size, seq_len
    block_inside = (7 * C + 2 * inner) * dtype_bytes + 4 * config.n_head  # per slot
    if thought_dropout and config.n_thoughts:
        block_inside += 2 * C * dtype_bytes
    per_slot_layer = 4 * C + (0 if checkpointing else block_inside)
    slots = [S * T for S, count in pass_schedule(config, n_jacobi) for _ in range(count)]
    longest = max(slots)
    if grad_passes and config.n_thoughts:
        slots = slots[-min(grad_passes, (config.n_jacobi if n_jacobi is None else n_jacobi) + 1):]
    final_ln = T if config.n_loop else sum(slots)  # Loop runs the final LayerNorm once, the others every pass
    kept = B * (sum(slots) * L * per_slot_layer + final_ln * 4 * C)  # + the final LayerNorms' inputs

    def probabilities(length):  # of one layer's attend_blocks over `length` positions, all heads
        return B * config.n_head * attention_probability_count(length) * dtype_bytes if blocks and blocks(length) else 0
    if not checkpointing:
        kept += L * sum(probabilities(length) for length in slots)
    kept += B * T * (4 * C + dtype_bytes * C + dtype_bytes * V)  # embeddings, the head's input, the logits
    if config.n_ponder:  # each pondering step keeps its fp32 softmax (and its cast for the matmul)
        kept += config.n_ponder * B * T * V * (4 + (dtype_bytes if dtype_bytes != 4 else 0))
    # backward's peak on top: the logits' gradient (in the compute dtype) or, when checkpointing, one
    # block's recomputed insides over the longest pass (without checkpointing, the gradients that backward
    # makes roughly take the place of the saved tensors it frees)
    recomputed = B * max(slots) * (4 * C + block_inside) + probabilities(max(slots)) if checkpointing else 0
    working = max(dtype_bytes * B * T * V, recomputed)
    if grad_passes and config.n_thoughts:  # a pass without a graph runs before the kept ones: its peak, if higher
        working = max(working, B * longest * (4 * C + block_inside) + probabilities(longest) - kept)
    return kept, working


@dataclass
class MemoryPlan:
    weights: float          # bytes per process: fp32 weights (shard), gathered or cast copies
    gradients: float
    optimizer: float        # AdamW's two moments
    activations: float      # kept for backward + backward's working peak, one micro-batch
    description: str        # the run it plans for

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    def summary(self):
        return (f"memory plan per process ({self.description}; an estimate): weights {human_bytes(self.weights)} + "
                f"gradients {human_bytes(self.gradients)} + AdamW {human_bytes(self.optimizer)} + activations "
                f"{human_bytes(self.activations)} = {human_bytes(self.total)}")


def plan_memory(config, batch_size, seq_len=None, *, n_jacobi=None, dtype=torch.float32, parallelism='ddp',
                world_size=1, grad_accum=1, activation_checkpointing=False, gather_dtype=torch.float32,
                device_type='cuda', grad_passes=0, thought_dropout=0.0):
    """The peak bytes per process of training GPT(config) with micro-batches of batch_size x seq_len tokens
    (default block_size), dtype the autocast compute dtype, grad_accum micro-batches per process and
    iteration, n_jacobi PonderLM-2's R (training: the largest it draws). ddp (and one process) replicates weights,
    gradients and AdamW state; fsdp shards them over world_size, and gathers a block at a time (gather_dtype: its
    MixedPrecisionPolicy's param_dtype) plus the root (embeddings, final LayerNorm), which stays gathered through
    forward and backward. device_type: where it trains, which decides the attention kernel (kernels.blocks_suit:
    the plan is for a model with the kernels installed, as every script runs it). grad_passes: PonderLM-2's G
    (activation_bytes); under fsdp every pass still gathers the weights, with a graph or without. thought_dropout:
    the probability p that a token stops at each thought (> 0: the skip map's copies of the keys and values)."""
    n = count_params(config)
    P = n['total']
    T = seq_len or config.block_size
    c = torch.finfo(dtype).bits // 8
    sharded = parallelism == 'fsdp' and world_size > 1
    shards = world_size if sharded else 1
    weights, grads, adam = 4 * P / shards, 4 * P / shards, 8 * P / shards
    cast = P  # the weights that autocast copies into the compute dtype (and keeps for backward)
    if sharded:
        g = torch.finfo(gather_dtype).bits // 8
        weights += 4 * n['root'] + g * 2 * n['block']  # the root (fp32) and two blocks (one prefetched) gathered
        # without a sync, micro-steps accumulate unsharded gradients (fp32) until the last one reduce-scatters
        grads += 4 * P if grad_accum > 1 else g * 2 * n['block']
        if gather_dtype == dtype:  # blocks gathered in the compute dtype need no cast
            cast = n['root']
    if c < 4:
        weights += c * cast
    kept, working = activation_bytes(config, batch_size, T, c, activation_checkpointing, n_jacobi,
                                     blocks=lambda length: kernels.blocks_suit(device_type, dtype, length),
                                     grad_passes=grad_passes, thought_dropout=thought_dropout > 0)
    slots = '+'.join(str(S) for S, count in pass_schedule(config, n_jacobi) for _ in range(count))
    description = (f"{config.method}, micro-batch {batch_size} x {T}, passes over {slots} slots per token, "
                   f"{str(dtype).removeprefix('torch.')}, {parallelism if world_size > 1 else 'one process'}"
                   f"{f' x {world_size}' if world_size > 1 else ''}"
                   f"{', activation checkpointing' if activation_checkpointing else ''}"
                   f"{f', backward through the last {grad_passes}' if grad_passes and config.n_thoughts else ''}"
                   f"{f', thought dropout {thought_dropout:g}' if thought_dropout and config.n_thoughts else ''}")
    return MemoryPlan(weights, grads, adam, kept + working, description)


# -----------------------------------------------------------------------------
# the measured peak, to check the plan against

def measure_training_peak(config, batch_size, seq_len=None, *, n_jacobi=None, dtype=torch.float32, device='cpu',
                          activation_checkpointing=False, steps=2, grad_passes=0):
    """Build GPT(config) and AdamW on device and run `steps` training steps (forward, backward, AdamW) with
    R = n_jacobi (default config.n_jacobi, as plan_memory) on random tokens; return the peak bytes that this added:
    the CUDA allocator's peak, or on a CPU the process's peak RSS (Linux /proc; None elsewhere). For CPU figures
    that mean anything, start the process with MALLOC_MMAP_THRESHOLD_=65536: glibc then returns every large freed
    block to the system at once, instead of keeping freed memory that RSS would still count."""
    import gc
    T = seq_len or config.block_size
    device_type = torch.device(device).type
    R = n_jacobi
    idx = torch.randint(0, config.vocab_size, (batch_size, T), device=device)
    ctx = autocast(device_type, dtype)

    def train(model, optimizer, x):
        for _ in range(steps):
            with ctx:
                loss = model(x, x, n_jacobi=R)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # warm up on a tiny model of the same method: kernels' one-time buffers are not the plan's business
    method = {k: getattr(config, k) for k in METHOD_COUNTS + ('pause_token_id',)}
    tiny = kernels.install(GPT(type(config)(n_layer=1, n_head=1, n_embd=8, vocab_size=config.vocab_size,
                                            block_size=8, **method)).to(device))
    tiny.activation_checkpointing, tiny.jacobi_grad_passes = activation_checkpointing, grad_passes
    train(tiny, torch.optim.AdamW(tiny.parameters()), idx[:1, :8])
    del tiny
    gc.collect()
    if device_type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            return None
        base = proc_status('VmRSS')
    model = kernels.install(GPT(config).to(device))  # as the scripts train it, and as plan_memory counts
    model.activation_checkpointing, model.jacobi_grad_passes = activation_checkpointing, grad_passes
    train(model, torch.optim.AdamW(model.parameters()), idx)
    if device_type == 'cuda':
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return max(0, proc_status('VmHWM') - base)  # (the kernel's RSS counters may lag by a few pages)


def proc_status(key):
    """A byte count from /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def kv_cache_slots(config):
    """The KV cache per token in units of a vanilla model's: PonderLM-2 and Pause cache their K thought or pause
    slots too (K+1), PonderLM, Hidden and Loop keep one cache per pass (N+1, K+1)."""
    return config.slots * config.n_caches


def kv_cache_bytes_per_token(config, bytes_per_value):
    """The keys and values that decoding caches per token, over all layers."""
    return 2 * config.n_layer * config.n_embd * bytes_per_value * kv_cache_slots(config)
