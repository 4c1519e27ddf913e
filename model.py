"""
One readable GPT-NeoX (the Pythia architecture) with the ways to spend compute per token that the PonderLM papers
compare, each a short function over the same trunk:

  vanilla     (no count set)   the plain language model
  PonderLM-2  n_thoughts=K     before predicting each next token the model emits K latent thoughts: its own last
                               hidden state fed back as the next input vector, x1 z1 x2 z2 ... (arXiv 2509.23184)
  PonderLM    n_ponder=N       N pondering steps, each adding the probability-weighted sum of token embeddings to
                               the input (arXiv 2505.20674)
  Pause       n_pause=K        K copies of one learned pause embedding after every token, x1 P..P x2 P..P ...;
                               the last pause predicts the next token
  Loop        n_loop=K         the whole layer stack run K+1 times with the same weights
  Hidden      n_hidden=N       N steps, each adding the trunk's last hidden state to the input

This file is the whole method and imports only torch: copy it into another project and it works.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig.preset('pythia-70m', n_thoughts=1))
    logits, loss = model(idx, targets)                            # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens=50, temperature=0)   # exact thoughts, KV cache

References:
1) the GPT-NeoX / Pythia architecture as implemented by Hugging Face transformers (modeling_gpt_neox.py),
   (numerically equal: see tests/test_model.py)
2) the PonderLM-2 and PonderLM papers and their released checkpoints' config keys
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional: used on CUDA in bf16/fp16 only, SDPA everywhere else
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# Pythia sizes: (n_layer, n_head, n_embd); every one has vocab 50304, context 2048, rotary_pct 0.25
PRESETS = {
    'pythia-14m': (6, 4, 128),
    'pythia-31m': (6, 8, 256),
    'pythia-70m': (6, 8, 512),
    'pythia-160m': (12, 12, 768),
    'pythia-410m': (24, 16, 1024),
    'pythia-1b': (16, 8, 2048),
    'pythia-1.4b': (24, 16, 2048),
    'pythia-2.8b': (32, 32, 2560),
}


@dataclass
class GPTConfig:
    block_size: int = 2048          # tokens of context (the thoughts share their token's position)
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    n_inner: int = None             # MLP width; None -> 4 * n_embd (as every Pythia)
    rotary_pct: float = 0.25        # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)), as every Pythia
    layer_norm_eps: float = 1e-5
    # PonderLM-2
    n_thoughts: int = 0             # K latent thoughts per token
    n_jacobi: int = 3               # Jacobi passes R of the forward by default (evaluation, the prompt in generate)
    # PonderLM (v1)
    n_ponder: int = 0               # N pondering steps
    ponder_multiply: bool = False   # multiply the first input embeddings by N
    # the baselines
    n_pause: int = 0                # Pause: K pause slots after every token
    pause_token_id: int = 50288     # Pause: the embedding row of the pause vector (one that no tokenizer produces)
    n_loop: int = 0                 # Loop: K extra runs of the layer stack, same weights
    n_hidden: int = 0               # Hidden-state feedback: N steps
    # all
    scale_embeds: bool = True       # embeddings * sqrt(2.5 H) (PonderLM-2, Loop always) or * sqrt(H) (PonderLM,
                                    # Pause, vanilla); Hidden never scales
    weight_init: str = 'small'      # 'small' (the papers': truncated normal sqrt(2/5H), output projections
                                    # shrunk by depth and passes) or 'normal' (normal(0, 0.02), stock Pythia/HF)

    def __post_init__(self):
        counts = {k: getattr(self, k) for k in METHOD_COUNTS}
        if sum(v > 0 for v in counts.values()) > 1:
            raise ValueError(f"{' and '.join(k for k, v in counts.items() if v)} are different methods: set at most "
                             f"one of {', '.join(METHOD_COUNTS)} > 0")
        if min(counts.values()) < 0 or self.n_jacobi < 0:
            raise ValueError(f"{', '.join(METHOD_COUNTS)} and n_jacobi must be >= 0")
        if self.n_pause and not 0 <= self.pause_token_id < self.vocab_size:
            raise ValueError(f"pause_token_id {self.pause_token_id} is no row of the embedding (vocab_size "
                             f"{self.vocab_size})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.weight_init not in ('small', 'normal'):
            raise ValueError(f"weight_init must be 'small' or 'normal', got {self.weight_init!r}")

    @property
    def method(self):
        """The method's short name: 'vanilla', 'ponderlm2-kK', 'ponderlm1-nN', 'pause-kK', 'loop-kK', 'hidden-nN'."""
        field = next((f for f in METHOD_NAMES if getattr(self, f)), None)
        return METHOD_NAMES[field][0] + str(getattr(self, field)) if field else 'vanilla'

    @property
    def method_label(self):
        """The method for people: 'vanilla', 'PonderLM-2 K=1', 'PonderLM N=3', 'Pause K=1', ..."""
        field = next((f for f in METHOD_NAMES if getattr(self, f)), None)
        return METHOD_NAMES[field][1] + str(getattr(self, field)) if field else 'vanilla'

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(**{'n_layer': n_layer, 'n_head': n_head, 'n_embd': n_embd, **overrides})

    @property
    def embed_scale(self):
        """What the input embeddings are multiplied by, as each method's official code does."""
        if self.n_loop:
            return math.sqrt(2.5 * self.n_embd)
        if self.n_hidden or not self.scale_embeds:
            return 1.0
        return math.sqrt((2.5 if self.n_thoughts else 1.0) * self.n_embd)

    @property
    def passes(self):
        """Trunk passes per token (1 for vanilla and Pause, K+1 or N+1 for the others)."""
        return max(self.n_thoughts, self.n_ponder, self.n_loop, self.n_hidden) + 1

    @property
    def n_caches(self):
        """KV caches that decoding keeps: one per pass for the methods that run the trunk over their own inputs
        again (PonderLM, Hidden, Loop), else one (PonderLM-2's passes all run over the one sequence of slots)."""
        return self.passes if self.n_ponder or self.n_hidden or self.n_loop else 1

    @property
    def slots(self):
        """Positions per token in the sequence the trunk sees (and in the KV cache): K+1 with thoughts or pauses."""
        return self.n_thoughts + self.n_pause + 1


# each count field > 0 chooses a method: its short name and its name for people, before the count
METHOD_NAMES = {'n_thoughts': ('ponderlm2-k', 'PonderLM-2 K='), 'n_ponder': ('ponderlm1-n', 'PonderLM N='),
                'n_pause': ('pause-k', 'Pause K='), 'n_loop': ('loop-k', 'Loop K='),
                'n_hidden': ('hidden-n', 'Hidden N=')}
METHOD_COUNTS = tuple(METHOD_NAMES)


# -----------------------------------------------------------------------------
# the GPT-NeoX block

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_(x, cos, sin):
    """Rotate the first cos.size(-1) dims of x (..., hs) in place; the rest pass through (partial rotary). In place,
    so that nothing is concatenated around the rotated dims, in forward or in backward."""
    rot = cos.size(-1)
    x_rot = x[..., :rot]
    x_rot.copy_(x_rot * cos + rotate_half(x_rot) * sin)  # the math in the tables' dtype, rounded once to x's
    return x


class KVCache:
    """Preallocated keys and values for every layer; `pos` slots are filled. Appending writes in place,
    so a decode step costs no reallocation (torch.cat per step would copy the whole cache each time)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    def append(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the filled part; return all keys and values so far."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.size(3)} slots")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    BACKENDS = ('auto', 'sdpa', 'flash', 'blocks')
    BLOCK = 128  # queries per block in attend_blocks
    BLOCKS_MAX_LEN = 1024  # 'auto' takes attend_blocks up to this many positions: it keeps O(T^2) probabilities

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        # the kernel: 'auto' = flash-attn where it can run (installed, CUDA, bf16/fp16), attend_blocks on a CPU in
        # fp32 or bf16 up to BLOCKS_MAX_LEN positions, SDPA elsewhere; 'sdpa', 'flash' or 'blocks' to force one
        # ('blocks' runs where no cache is filled: decoding steps after a cache take SDPA). See set_backend.
        self.attn_backend = 'auto'

    @staticmethod
    def set_backend(model, backend):
        """Choose the attention kernel of every Attention in model (a GPT, or any module holding them):
        Attention.set_backend(model, 'sdpa'). 'flash' without the flash_attn package is a ValueError."""
        if backend not in Attention.BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(Attention.BACKENDS)}, got {backend!r}")
        if backend == 'flash' and flash_attn_func is None:
            raise ValueError("attention backend 'flash' needs the flash_attn package (pip install flash-attn, "
                             "CUDA only); use 'auto' or 'sdpa'")
        for module in model.modules():
            if isinstance(module, Attention):
                module.attn_backend = backend

    @staticmethod
    def flash_suits(device_type, dtype):
        """Whether 'auto' picks flash-attn for attention computed on device_type in dtype."""
        return flash_attn_func is not None and device_type == 'cuda' and dtype in (torch.bfloat16, torch.float16)

    @staticmethod
    def blocks_suit(device_type, dtype, length):
        """Whether 'auto' picks attend_blocks for `length` positions attending each other on device_type in dtype."""
        return (device_type == 'cpu' and dtype in (torch.float32, torch.bfloat16)
                and length <= Attention.BLOCKS_MAX_LEN)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.size()
        # HF's fused layout is per head: the 3C output rows are grouped [head, (q, k, v), head_size]
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3, self.head_size)
        apply_rotary_(qkv[:, :, :, :2], cos, sin)  # q and k at once, with cos, sin (T, 1, 1, rot)
        q, k, v = qkv.transpose(1, 2).unbind(dim=3)  # each (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.append(layer, k, v)  # (B, nh, past + T, hs)
        y = self.attend(q, k, v, past)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dense(y)

    def attend(self, q, k, v, past):
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, past + T, hs), with the chosen backend."""
        # q, k, v come out of query_key_value in the dtype the layers compute in (autocast's, if it is on)
        device_type, dtype = q.device.type, q.dtype
        flash = self.attn_backend == 'flash' or (self.attn_backend == 'auto' and self.flash_suits(device_type, dtype))
        if flash:
            if device_type != 'cuda' or dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"attention backend 'flash' runs on CUDA in bfloat16 or float16, not on "
                                 f"{device_type} in {dtype}; use 'auto' or 'sdpa'")
            # flash-attn aligns its causal mask to the bottom right, so it is right with a cache too
            y = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
            return y.transpose(1, 2)
        T = q.size(2)
        if past == 0:  # query and key lengths equal
            blocks = self.attn_backend == 'auto' and self.blocks_suit(device_type, dtype, T)
            if blocks or self.attn_backend == 'blocks':
                return self.attend_blocks(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # top-left aligned is_causal is right
        if T == 1:  # one new position sees the whole cache: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        # several new positions after a cache: query i sees keys up to past + i
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def attend_blocks(self, q, k, v):
        """Causal attention of q, k, v (B, nh, T, hs) as plain matmuls, BLOCK queries at a time over the keys up to
        the block's last (the later ones are all masked: about half the work skipped); see BlockAttention."""
        B, nh, T, hs = q.size()
        # (B * nh, T, hs), contiguous once: every block is a view that the matmuls take without a copy
        q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
        return BlockAttention.apply(q, k, v, self.BLOCK).view(B, nh, T, hs)


class BlockAttention(torch.autograd.Function):
    """Causal attention of q, k, v (N, T, hs), `block` queries at a time: on a CPU its forward + backward takes
    0.4-0.6x the time of SDPA's kernel in bf16 and 0.7-0.85x in fp32 (T = 256-1024, 64-wide heads), SDPA's
    backward being slow there. It keeps each block's probabilities P (N, b - a, b) in the compute dtype (softmax
    sums in fp32 and rounds its output to the scores' dtype, as eager attention does). Backward is written out
    because autograd's would give every block's keys and values a gradient the size of the whole sequence, zero
    past the block, and add them up one by one; here each block adds into the rows it read."""

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


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.dense_h_to_4h = nn.Linear(config.n_embd, n_inner)
        self.dense_4h_to_h = nn.Linear(n_inner, config.n_embd)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU, as Pythia


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        attn = self.attention(self.input_layernorm(x), cos, sin, cache, layer)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names follow Hugging Face's GPTNeoXForCausalLM so checkpoints map one to one
        self.embed_in = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.register_buffer('rope_cos', torch.empty(0), persistent=False)
        self.register_buffer('rope_sin', torch.empty(0), persistent=False)
        self.init_rope()
        self._init_weights()

    def init_rope(self):
        """cos/sin tables (block_size, rot) for the rotate-half rotary embedding on rot dims per head."""
        hs = self.config.n_embd // self.config.n_head
        rot = int(hs * self.config.rotary_pct)
        device = self.embed_in.weight.device
        inv_freq = 1.0 / (self.config.rotary_base ** (torch.arange(0, rot, 2, device=device).float() / rot))
        t = torch.arange(self.config.block_size, device=device).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, rot)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def _init_weights(self):
        cfg = self.config
        if cfg.weight_init == 'normal':  # stock Hugging Face init: the papers' baseline
            std = proj_std = 0.02
        else:  # 'small': sqrt(2/(5H)), output projections also shrunk by depth times passes per token
            std = math.sqrt(2 / (5 * cfg.n_embd))
            proj_std = std / math.sqrt(2 * cfg.n_layer * cfg.passes)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = proj_std if name.endswith(('attention.dense', 'dense_4h_to_h')) else std
                if cfg.weight_init == 'normal':
                    nn.init.normal_(module.weight, 0.0, s)
                else:
                    nn.init.trunc_normal_(module.weight, 0.0, s, a=-3 * s, b=3 * s)
                if getattr(module, 'bias', None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out embed_in and embed_out (the Pythia paper's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_in.weight.numel() + self.embed_out.weight.numel()
        return n

    # --- the trunk f: blocks + final LayerNorm on input vectors at given positions ---

    # activation checkpointing: keep only each Block's input for backward and recompute its insides there, in
    # every pass of the thought loop. It changes no result, only memory against time.
    activation_checkpointing = False

    def trunk(self, x, pos, cache=None):
        """x (B, T, C) input vectors, pos (T,) position ids -> (B, T, C) hidden states after the final LN."""
        return self.final_layer_norm(self.blocks(x, pos, cache))

    def blocks(self, x, pos, cache=None):
        """The layer stack alone: x (B, T, C) at positions pos (T,) -> the residual stream (B, T, C) after it;
        with a cache, every layer also appends its keys and values to it."""
        cos, sin = self.rotary(pos, x.dtype)
        # nothing to recompute without a backward (evaluation, decoding with its KV cache)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if cache is not None:  # decoding: the block also appends its keys and values to the cache
                x = block(x, cos, sin, cache, i)
            elif recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:  # (no layer index: a compiled Block would specialize its graph on it)
                x = block(x, cos, sin)
        if cache is not None:
            cache.pos += x.size(1)
        return x

    def rotary(self, pos, dtype):
        """The rotary tables at position ids pos (T,) in dtype, shaped (T, 1, 1, rot) as the Blocks take them: they
        broadcast over q and k laid out (B, T, nh, 2, hs)."""
        return self.rope_cos[pos].to(dtype)[:, None, None], self.rope_sin[pos].to(dtype)[:, None, None]

    def embed(self, idx):
        return self.embed_in(idx) * self.config.embed_scale  # (B, T, C)

    def positions(self, n_tokens, caches, device):
        """Position ids (n_tokens,) of the tokens that come after what the caches hold (none: from 0)."""
        start = caches[0].pos // self.config.slots if caches else 0
        return torch.arange(start, start + n_tokens, device=device)

    # --- forward ---

    def forward(self, idx, targets=None, n_jacobi=None):
        """idx (B, T) -> logits (B, T, V) at every position; loss if targets (B, T) is given (-1 = ignore).
        n_jacobi: PonderLM-2's Jacobi passes R (default config.n_jacobi)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        if self.config.n_thoughts:
            h = self.think(idx, self.config.n_jacobi if n_jacobi is None else n_jacobi)
        else:
            h = self.causal(idx)
        logits = self.embed_out(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def think(self, idx, n_jacobi, cache=None, stop=None):
        """PonderLM-2: K latent thoughts per token, computed in parallel with n_jacobi Jacobi passes.

        Stage 0 holds the token vectors e_t; stage j (1..K) holds every token's j-th thought z_t^j. The
        stages are interleaved token-major into one sequence e_1 z_1^1..z_1^K e_2 z_2^1.. of (K+1)T slots,
        every slot at its token's position id, and run through the trunk f with plain causal attention.
        The thought z_t^j is f's output at the slot before it (e_t for j = 1), so one pass over the slots
        refreshes every thought at once. Each pass makes at least one more thought exact: n_jacobi >= K(T-1)
        is exactly the sequential, token-by-token computation.
        cache: a KVCache that ends up holding the keys and values of the pass that returns.
        stop(r, thoughts (B, T, K, C), h (B, T, C)) -> bool: called after every pass r = 0..n_jacobi with the
        thoughts after r Jacobi passes and what they predict from (what think(idx, r) returns); True stops
        there (see settled). Returns the hidden state at each token's last thought slot, (B, T, C)."""
        K = self.config.n_thoughts
        e = self.embed(idx)  # (B, T, C)
        stages = [e]
        # stage building: with k+1 stages run f and append the outputs at the last stage's slots
        # (refreshing the earlier thought stages too); for K=1 this is one plain pass over the T tokens
        for _ in range(K):
            h = self.run_stages(stages)  # (B, T, S, C) with S = len(stages)
            stages = [e] + list(h.unbind(dim=2))
        start = cache.pos if cache is not None else 0
        for r in range(n_jacobi + 1):
            if cache is not None:  # every pass rewrites the same slots: the last pass's keys and values stay
                cache.pos = start
            h = self.run_stages(stages, cache)  # (B, T, K+1, C): f's outputs over the thoughts of r passes
            stopped = stop is not None and stop(r, torch.stack(stages[1:], dim=2), h[:, :, K])
            if stopped or r == n_jacobi:
                return h[:, :, K]
            stages = [e] + list(h[:, :, :K].unbind(dim=2))  # the Jacobi step: thought j+1 <- output at slot j

    def exact_passes(self, n_tokens):
        """The Jacobi passes after which every thought of n_tokens tokens is exact, K(T-1): each pass makes at least
        one more thought exact (see think)."""
        return self.config.n_thoughts * (n_tokens - 1)

    def run_stages(self, stages, cache=None):
        """Interleave S stages of (B, T, C) token-major, run f once, return outputs as (B, T, S, C). Every slot is at
        its token's position id; with a cache, the tokens come after what it holds."""
        B, T, C = stages[0].size()
        S = len(stages)
        x = torch.stack(stages, dim=2).view(B, T * S, C)  # e_1 z_1^1 .. e_2 z_2^1 ..
        pos = self.positions(T, cache and [cache], x.device).repeat_interleave(S)
        return self.trunk(x, pos, cache).view(B, T, S, C)

    # --- the methods that are causal over their tokens: one parallel forward is also their exact decode step ---

    def causal(self, idx, caches=None):
        """Hidden states (B, T, C) that predict each next token, for every method but PonderLM-2; with caches (one
        per pass, see new_caches), the tokens idx (B, T) come after what the caches hold and are added to them."""
        cfg = self.config
        if cfg.n_ponder or cfg.n_hidden:
            return self.ponder(idx, caches)
        if cfg.n_pause:
            return self.pause(idx, caches[0] if caches else None)
        pos = self.positions(idx.size(1), caches, idx.device)
        if cfg.n_loop:
            return self.loop(idx, pos, caches)
        return self.trunk(self.embed(idx), pos, caches[0] if caches else None)

    def ponder(self, idx, caches=None):
        """PonderLM v1: N times, add the probability-weighted sum of token embeddings to the input. Hidden-state
        feedback: N times, add the trunk's output itself. Returns the last pass's hidden states."""
        cfg = self.config
        N, s = cfg.n_ponder or cfg.n_hidden, cfg.embed_scale
        pos = self.positions(idx.size(1), caches, idx.device)
        c = self.embed(idx) * (N if cfg.ponder_multiply and cfg.n_ponder else 1)  # (B, T, C)
        for step in range(N + 1):
            h = self.trunk(c, pos, caches[step] if caches else None)  # (B, T, C)
            if step == N:
                return h
            if cfg.n_hidden:
                c = c + h
            else:
                probs = F.softmax(self.embed_out(h), dim=-1)  # (B, T, V)
                c = c + (probs @ self.embed_in.weight) * s  # (B, T, C): the expected embedding

    def pause(self, idx, cache=None):
        """Pause: every token followed by K copies of the pause embedding, all at the token's position, one causal
        pass over the (K+1)T slots; the output at each token's last pause predicts the next token."""
        e = self.embed(idx)  # (B, T, C)
        p = self.embed(torch.full_like(idx, self.config.pause_token_id))  # (B, T, C): the same vector everywhere
        return self.run_stages([e] + [p] * self.config.n_pause, cache)[:, :, -1]

    def loop(self, idx, pos, caches=None):
        """Loop: the layer stack K+1 times with the same weights, the residual stream going from the last layer
        straight back into the first; the final LayerNorm once at the end. One cache per run of the stack."""
        x = self.embed(idx)  # (B, T, C)
        for j in range(self.config.n_loop + 1):
            x = self.blocks(x, pos, caches[j] if caches else None)
        return self.final_layer_norm(x)

    # --- the exact, sequential computation through a KV cache: decoding ---

    def new_caches(self, batch_size, max_len, device):
        """Empty KV caches for max_len tokens (and their thought or pause slots), in the dtype the layers compute in
        (autocast's, if it is on): one per pass of PonderLM, Hidden and Loop, else one."""
        cfg, dtype = self.config, self.compute_dtype(device)
        return [KVCache(cfg, batch_size, cfg.slots * max_len, device, dtype) for _ in range(cfg.n_caches)]

    def compute_dtype(self, device):
        """The dtype the layers compute in on device: autocast's, if it is on, else the weights'."""
        device_type = torch.device(device).type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.embed_in.weight.dtype

    def sequential(self, idx, caches):
        """Run the tokens idx (B, T) through the caches after what they hold, exactly as decoding does: PonderLM-2
        one token at a time, the token and then K times its last output, all at the token's position. Returns the
        hidden states that predict each next token (B, T, C) and PonderLM-2's thoughts (B, T, K, C), else None."""
        B, T = idx.size()
        K = self.config.n_thoughts
        if not K:  # no thoughts: every pass is causal, so all the tokens go at once
            return self.causal(idx, caches), None
        hs, thoughts = [], []
        for t in range(T):
            pos = self.positions(1, caches, idx.device)
            h = self.trunk(self.embed(idx[:, t:t + 1]), pos, caches[0])  # (B, 1, C)
            for _ in range(K):  # each thought is the previous slot's output, fed back at the same position
                thoughts.append(h)
                h = self.trunk(h, pos, caches[0])
            hs.append(h)
        return torch.cat(hs, dim=1), torch.cat(thoughts, dim=1).view(B, T, K, -1)

    @torch.no_grad()
    def sequential_logits(self, idx):
        """Teacher-forced logits (B, T, V) with exact thoughts, computed as decoding computes them."""
        h, _ = self.sequential(idx, self.new_caches(idx.size(0), idx.size(1), idx.device))
        return self.embed_out(h)

    def prefill(self, idx, max_len, n_jacobi=None, stop=None, exact=False):
        """Run a prompt (B, T) into fresh caches with room for max_len tokens -> (the hidden state that predicts the
        next token (B, C), caches).
        PonderLM-2 computes the prompt's thoughts with n_jacobi passes (default config.n_jacobi; with a stop
        predicate, up to the exact K(T-1)), or sequentially when exact."""
        B, T = idx.size()
        caches = self.new_caches(B, max_len, idx.device)
        K = self.config.n_thoughts
        if K and not exact:
            if n_jacobi is None:
                n_jacobi = self.config.n_jacobi if stop is None else self.exact_passes(T)
            h = self.think(idx, n_jacobi, caches[0], stop)
        else:
            h, _ = self.sequential(idx, caches)
        return h[:, -1], caches

    def decode_one(self, idx_next, caches):
        """Feed one new token (B, 1) through the caches; return the hidden state that predicts the next (B, C)."""
        h, _ = self.sequential(idx_next, caches)
        return h[:, -1]

    def recompute_logits(self, idx):
        """Next-token logits (B, V) recomputed from scratch without a cache, with enough Jacobi passes to be exact:
        the reference that decoding through the cache must equal."""
        logits, _ = self(idx, n_jacobi=self.exact_passes(idx.size(1)))
        return logits[:, -1]

    # --- generation ---

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, **prompt):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. The prompt must fit in
        block_size, the new tokens need not (see generate_stream, and its prompt options n_jacobi, stop, exact)."""
        out = [idx]
        for idx_next, _ in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, **prompt):
            out.append(idx_next)
        return torch.cat(out, dim=1)

    @torch.inference_mode()  # (no autograd bookkeeping at all: ~8% faster per token than no_grad at batch 1)
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        n_jacobi=None, stop=None, exact=False):
        """Yield (idx_next (B, 1), logits (B, V)) for each new token: logits are what it was sampled from.
        The prompt's thoughts come from the cached prefill (n_jacobi, stop, exact: see prefill); those of every
        generated token are exact. No model sees more than block_size tokens: when a new token does not fit, the
        window slides, keeping its last half (block_size // 2 tokens), recomputed exactly into fresh caches, and grows
        from there again. use_cache=False recomputes every step from scratch over the same windows: the reference."""
        B, T = idx.size()
        if T == 0:
            raise ValueError("generate needs at least one prompt token (e.g. the EOS token)")
        if T > self.config.block_size:
            raise ValueError(f"the prompt ({T} tokens) is longer than block_size {self.config.block_size}: "
                             f"keep its last {self.config.block_size} tokens")
        L = self.config.block_size
        window = idx  # (B, L) with L <= block_size: the tokens the next logits are computed from
        if use_cache:  # (the caches never need more room than the context)
            # embed_out's weight copied once as a (C, V) matrix in the layers' dtype: a few rows times it read the
            # weight in memory order, which a CPU's BLAS does about 2.5x faster than through nn.Linear's (V, C)
            # layout, and at batch 1 that product is most of a step (measured in docs/cost.md)
            head = self.embed_out.weight.detach().t().to(self.compute_dtype(idx.device)).contiguous()  # (C, V)
            h, caches = self.prefill(idx, min(T + max_new_tokens, L), n_jacobi, stop, exact)
            logits = h.to(head.dtype) @ head  # (B, V)
        else:
            logits = self.recompute_logits(window)
        for i in range(max_new_tokens):
            idx_next = sample(logits.float(), temperature, top_k, top_p)  # (B, 1)
            yield idx_next, logits
            if i == max_new_tokens - 1:
                return  # nothing left to predict: the last token need not be run
            window = torch.cat((window, idx_next), dim=1)
            slide = window.size(1) > L
            if slide:
                window = window[:, -max(1, L // 2):]
            if not use_cache:
                logits = self.recompute_logits(window)
            else:
                if slide:
                    h, caches = self.prefill(window, min(window.size(1) + max_new_tokens - i, L), exact=True)
                else:
                    h = self.decode_one(idx_next, caches)
                logits = h.to(head.dtype) @ head  # (B, V)


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> token ids (B, 1). temperature 0 is greedy; top_k and top_p (nucleus) filter first."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # the largest logit is set to 0 and the others scaled below it, so that a tiny temperature sends them to -inf
    # (the limit T -> 0: greedy, ties shared) instead of overflowing to inf and nan
    top = logits.amax(dim=-1, keepdim=True)
    logits = torch.where(logits == top, 0.0, (logits - top) / temperature)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -float('inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=-1), the same float32 math, a few rows at a time: the
    logits (N, V) stay in their dtype (autocast's bf16) and are never copied whole to float32, and backward writes
    the gradient softmax - one-hot straight in that dtype. The float32 rows go through two buffers allocated once
    per call, not per chunk: a fresh few-MB tensor is fresh pages, and on a CPU their faults cost more than the
    math. Over a 50k vocabulary that is a fifth of the time of F.cross_entropy(logits.float())."""

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


def cross_entropy(logits, targets, rows=16):
    """The mean cross-entropy of logits (N, V) against targets (N,), -1 = ignore; see CrossEntropy."""
    return CrossEntropy.apply(logits, targets, rows)


def relative_change(new, old):
    """||new - old|| / ||new|| of two tensors, as a float."""
    new, old = new.float(), old.float()
    return ((new - old).norm() / new.norm().clamp_min(1e-30)).item()


def settled(tol):
    """A stop predicate for GPT.think (adaptive Jacobi): stop once a pass has moved the thoughts by at most tol
    relative to their size, over the whole batch. tol=0 waits for the exact fixed point, a huge tol stops after one
    pass. One predicate per think: it remembers the previous pass's thoughts."""
    previous = []

    def stop(r, thoughts, h):
        done = bool(previous) and relative_change(thoughts, previous[0]) <= tol
        previous[:] = [thoughts]
        return done
    return stop
