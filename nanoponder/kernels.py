"""
Faster kernels for model.py's two seams, the same math as its plain PyTorch: each Attention's `attend` (flash-attn on
CUDA, attention in blocks with a written-out backward on a CPU) and GPT's `cross_entropy` (float32 a few rows at a
time). install(model) puts them in; every script that trains, samples, evaluates or benchmarks calls it. Why and
how fast: docs/cost.md.

    from nanoponder import kernels
    kernels.install(model)                 # attention by the 'auto' rule, decided per call; the chunked loss
    kernels.set_backend(model, 'sdpa')     # or force one attention kernel: auto | sdpa | flash | blocks

The 'auto' rule: flash-attn where it can run (installed, CUDA, bf16 or fp16); on a CPU in fp32 or bf16, attention
in blocks where no cache is filled and up to BLOCKS_MAX_LEN positions (it keeps O(T^2) probabilities for backward);
model.causal_attention (SDPA) everywhere else. A model that never gets install runs model.py's plain path: an
exported model in transformers does.
"""
import torch

from model import GPT, Attention, causal_attention

try:  # optional: CUDA only
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

BACKENDS = ('auto', 'sdpa', 'flash', 'blocks')
BLOCK = 128  # queries per block of attend_blocks
BLOCKS_MAX_LEN = 1024  # 'auto' takes attend_blocks up to this many positions


def install(model):
    """The kernels into every Attention and GPT of model (a GPT, or a module holding one): attention by the 'auto'
    rule and the chunked cross-entropy. Returns model. A model of another copy of model.py (transformers loads an
    export's under another name) is a ValueError: it keeps its plain path."""
    gpts = [module for module in model.modules() if isinstance(module, GPT)]
    if not gpts:
        raise ValueError(f"kernels.install takes a model.GPT (or a module holding one), got {type(model).__name__}")
    set_backend(model, 'auto')
    for gpt in gpts:
        gpt.cross_entropy = cross_entropy
    return model


def set_backend(model, backend):
    """The attention kernel of every Attention in model: 'auto' (attend), 'sdpa' (model.causal_attention), 'flash'
    (attend_flash) or 'blocks' (attend_in_blocks). 'flash' without the flash_attn package is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == 'flash' and flash_attn_func is None:
        raise ValueError("attention backend 'flash' needs the flash_attn package (pip install flash-attn, "
                         "CUDA only); use 'auto' or 'sdpa'")
    kernel = {'auto': attend, 'sdpa': causal_attention, 'flash': attend_flash, 'blocks': attend_in_blocks}[backend]
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = kernel


def flash_suits(device_type, dtype):
    """Whether 'auto' picks flash-attn for attention computed on device_type in dtype."""
    return flash_attn_func is not None and device_type == 'cuda' and dtype in (torch.bfloat16, torch.float16)


def blocks_suit(device_type, dtype, length):
    """Whether 'auto' picks attend_blocks for `length` positions attending each other on device_type in dtype."""
    return device_type == 'cpu' and dtype in (torch.float32, torch.bfloat16) and length <= BLOCKS_MAX_LEN


def attend(q, k, v, past=0):
    """model.causal_attention's result by the 'auto' rule, chosen per call from q's device, dtype and length.
    q, k, v come out of query_key_value in the dtype the layers compute in (autocast's, if it is on)."""
    if flash_suits(q.device.type, q.dtype):
        return attend_flash(q, k, v, past)
    if past == 0 and blocks_suit(q.device.type, q.dtype, q.size(2)):
        return attend_blocks(q, k, v)
    return causal_attention(q, k, v, past)


def attend_flash(q, k, v, past=0):
    """Causal attention by flash-attn (CUDA, bf16 or fp16 only). Its causal mask is aligned to the bottom right, so
    it is right after a cache too."""
    if q.device.type != 'cuda' or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention backend 'flash' runs on CUDA in bfloat16 or float16, not on "
                         f"{q.device.type} in {q.dtype}; use 'auto' or 'sdpa'")
    return flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True).transpose(1, 2)


def attend_in_blocks(q, k, v, past=0):
    """attend_blocks where no cache is filled; after a cache (decoding steps), model.causal_attention."""
    return attend_blocks(q, k, v) if past == 0 else causal_attention(q, k, v, past)


def attend_blocks(q, k, v):
    """Causal attention of q, k, v (B, nh, T, hs) as plain matmuls, BLOCK queries at a time over the keys up to the
    block's last (the later ones are all masked: about half the work skipped); see BlockAttention."""
    B, nh, T, hs = q.size()
    # (B * nh, T, hs), contiguous once: every block is a view that the matmuls take without a copy
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    return BlockAttention.apply(q, k, v, BLOCK).view(B, nh, T, hs)


class BlockAttention(torch.autograd.Function):
    """Causal attention of q, k, v (N, T, hs), `block` queries at a time. It keeps each block's probabilities P
    (N, b - a, b) in the compute dtype (softmax sums in fp32 and rounds its output to the scores' dtype, as eager
    attention does). Backward is written out because autograd's would give every block's keys and values a gradient
    the size of the whole sequence, zero past the block, and add them up one by one; here each block adds into the
    rows it read."""

    @staticmethod
    def forward(ctx, q, k, v, block):
        N, T, hs = q.size()
        out = torch.empty_like(q)
        probs = []
        for a in range(0, T, block):
            b = min(a + block, T)
            # -inf on the keys after each query, added inside the scores' matmul (no masking pass)
            mask = torch.full((b - a, b), float('-inf'), dtype=q.dtype, device=q.device).triu(a + 1)
            s = torch.baddbmm(mask, q[:, a:b], k[:, :b].transpose(1, 2), alpha=hs ** -0.5)  # (N, b - a, b)
            probs.append(torch.softmax(s, dim=-1))
            out[:, a:b] = probs[-1] @ v[:, :b]  # (N, b - a, hs)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *probs = ctx.saved_tensors
        T, scale = q.size(1), q.size(2) ** -0.5
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # per block, with G the output's gradient: dV += P^T G, dS = softmax's backward of G V^T,
        # dQ = scale * dS K, dK += scale * dS^T Q
        for a, p in zip(range(0, T, ctx.block), probs):
            b = a + p.size(1)
            g = grad[:, a:b]  # (N, b - a, hs)
            dv[:, :b].baddbmm_(p.transpose(1, 2), g)
            # softmax's own backward kernel (what autograd runs): P * (dP - rowsum(dP * P)), summed in fp32
            ds = torch._softmax_backward_data(g @ v[:, :b].transpose(1, 2), p, -1, p.dtype)  # (N, b - a, b)
            dq[:, a:b] = ds @ k[:, :b]
            dk[:, :b].baddbmm_(ds.transpose(1, 2), q[:, a:b], alpha=scale)
        return dq.mul_(scale), dk, dv, None


def cross_entropy(logits, targets, rows=16):
    """model.cross_entropy, the mean cross-entropy of logits (N, V) against targets (N,) (-1 = ignore) in float32,
    a few rows at a time; see CrossEntropy."""
    return CrossEntropy.apply(logits, targets, rows)


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=-1), the same float32 math, `rows` rows at a time: the
    logits (N, V) stay in their dtype (autocast's bf16) and are never copied whole to float32, and backward writes
    the gradient softmax - one-hot straight in that dtype. The float32 rows go through two buffers allocated once
    per call, not per chunk: fresh pages cost a CPU more in page faults than the math."""

    @staticmethod
    def forward(ctx, logits, targets, rows):
        keep = targets != -1  # (N,)
        t = targets.clamp_min(0)[:, None]  # (N, 1): an ignored row picks class 0, weighted 0
        x32, out32 = CrossEntropy.buffers(logits, rows)
        logp = torch.cat([torch.log_softmax(CrossEntropy.float32(x, x32), dim=-1, out=out32[:len(x)])
                          .gather(1, tj) for x, tj in zip(logits.split(rows), t.split(rows))])  # (N, 1): log p(target)
        n = keep.sum()
        ctx.save_for_backward(logits, t, keep, n)
        ctx.rows = rows
        return -(logp.squeeze(1) * keep).sum() / n  # no row kept: nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad):
        logits, t, keep, n = ctx.saved_tensors
        scale = (grad / n * keep)[:, None]  # (N, 1)
        out = torch.empty_like(logits)
        x32, p32 = CrossEntropy.buffers(logits, ctx.rows)
        for o, x, tj, sj in zip(*(a.split(ctx.rows) for a in (out, logits, t, scale))):
            p = torch.softmax(CrossEntropy.float32(x, x32), dim=-1, out=p32[:len(x)])  # (rows, V)
            p.scatter_add_(1, tj, torch.full_like(sj, -1.0))  # minus the one-hot
            o.copy_(p.mul_(sj))  # rounded once, into the logits' dtype
        return out, None, None

    @staticmethod
    def buffers(logits, rows):
        """Two float32 (rows, V) buffers that every chunk of rows reuses."""
        shape = (min(rows, logits.size(0)), logits.size(1))
        return (torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(2))

    @staticmethod
    def float32(x, buf):
        """The chunk x (rows, V) in float32: itself if it already is (no copy), else copied into buf."""
        return x if x.dtype == torch.float32 else buf[:len(x)].copy_(x)
