"""
One readable GPT-NeoX (the Pythia architecture) with three ways to spend compute per token:

  vanilla     n_thoughts=0, n_ponder=0   the plain language model
  PonderLM-2  n_thoughts=K               before predicting each next token the model emits K latent
                                         thoughts: its own last hidden state fed back as the next input
                                         vector, x1 z1 x2 z2 ... (arXiv 2509.23184)
  PonderLM    n_ponder=N                 N pondering steps, each adding the probability-weighted sum
                                         of token embeddings to the input (arXiv 2505.20674)

Usage:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.preset('pythia-70m', n_thoughts=1))
    logits, loss = model(idx, targets)                      # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens=50, temperature=0)   # exact thoughts, KV cache
    model = GPT.from_pretrained('EleutherAI/pythia-70m')    # or a local Hugging Face directory

References:
1) the GPT-NeoX / Pythia architecture as implemented by Hugging Face transformers (modeling_gpt_neox.py),
   which the tests use as a numerical peer
2) the PonderLM-2 and PonderLM papers and their released checkpoints' config keys
"""

import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields, replace

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

# dense bf16 peak TFLOP/s, looked up by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {'H200': 989, 'H100': 989, 'A100': 312, 'A10G': 125, 'A6000': 155, 'L40S': 362, 'L4': 121,
               '4090': 165, '3090': 71, 'V100': 125}


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
    n_jacobi: int = 3               # Jacobi refinement passes in eval and for the prompt in generate
    jacobi_train_range: tuple = (2, 4)  # R is drawn uniformly from this inclusive range in training
    # PonderLM (v1)
    n_ponder: int = 0               # N pondering steps
    ponder_multiply: bool = False   # multiply the first input embeddings by N
    # both
    scale_embeds: bool = True       # embeddings * sqrt(2.5 H) (PonderLM-2) or * sqrt(H) (others)
    weight_init: str = 'small'      # 'small' (the papers': truncated normal sqrt(2/5H), output projections
                                    # shrunk by depth and passes) or 'normal' (normal(0, 0.02), stock Pythia/HF)

    def __post_init__(self):
        self.jacobi_train_range = tuple(self.jacobi_train_range)
        if self.n_thoughts and self.n_ponder:
            raise ValueError("n_thoughts and n_ponder are two different methods: set at most one of them > 0")
        if self.n_thoughts < 0 or self.n_ponder < 0 or self.n_jacobi < 0:
            raise ValueError("n_thoughts, n_ponder and n_jacobi must be >= 0")
        lo, hi = self.jacobi_train_range
        if not 0 <= lo <= hi:
            raise ValueError(f"jacobi_train_range must be (lo, hi) with 0 <= lo <= hi, got {self.jacobi_train_range}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.weight_init not in ('small', 'normal'):
            raise ValueError(f"weight_init must be 'small' or 'normal', got {self.weight_init!r}")

    @property
    def method(self):
        """The method's short name, the one vocabulary of configs, bench, experiments and logs:
        'vanilla', 'ponderlm2-kK' (PonderLM-2, K thoughts per token) or 'ponderlm1-nN' (PonderLM, N steps)."""
        if self.n_thoughts:
            return f'ponderlm2-k{self.n_thoughts}'
        if self.n_ponder:
            return f'ponderlm1-n{self.n_ponder}'
        return 'vanilla'

    @property
    def method_label(self):
        """The method for people: 'vanilla', 'PonderLM-2 K=1', 'PonderLM N=3'."""
        if self.n_thoughts:
            return f'PonderLM-2 K={self.n_thoughts}'
        if self.n_ponder:
            return f'PonderLM N={self.n_ponder}'
        return 'vanilla'

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(**{'n_layer': n_layer, 'n_head': n_head, 'n_embd': n_embd, **overrides})

    @property
    def embed_scale(self):
        if not self.scale_embeds:
            return 1.0
        return math.sqrt((2.5 if self.n_thoughts else 1.0) * self.n_embd)


METHOD_RE = re.compile(r'vanilla|ponderlm2-k([1-9][0-9]*)|ponderlm1-n([1-9][0-9]*)')


def method_settings(name):
    """GPTConfig fields of a method name (see GPTConfig.method): 'ponderlm2-k2' -> {'n_thoughts': 2}."""
    m = METHOD_RE.fullmatch(name.strip().lower())
    if not m:
        zero = re.fullmatch(r'ponderlm2-k0+|ponderlm1-n0+', name.strip().lower())
        what = f"method {name!r} has K or N 0 (none at all is 'vanilla')" if zero else f"unknown method {name!r}"
        raise ValueError(f"{what}; use vanilla, ponderlm2-kK or ponderlm1-nN with K, N >= 1 (e.g. ponderlm2-k1, "
                         f"ponderlm1-n3)")
    return {'n_thoughts': int(m.group(1) or 0), 'n_ponder': int(m.group(2) or 0)}


# -----------------------------------------------------------------------------
# the GPT-NeoX block

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate the first cos.size(-1) dims of x (B, nh, T, hs); the rest pass through (partial rotary)."""
    rot = cos.size(-1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


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
    BACKENDS = ('auto', 'sdpa', 'flash')

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        # the kernel: 'auto' = flash-attn where it can run (installed, CUDA, bf16/fp16), SDPA elsewhere;
        # 'sdpa' or 'flash' to force one (bench.py times one against the other). See set_backend.
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

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.size()
        # HF's fused layout is per head: the 3C output rows are grouped [head, (q, k, v), head_size]
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size)
        q, k, v = qkv.transpose(1, 2).split(self.head_size, dim=-1)  # each (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.append(layer, k, v)  # (B, nh, past + T, hs)
        y = self.attend(q, k, v, past)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dense(y)

    def attend(self, q, k, v, past):
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, past + T, hs), with the chosen backend."""
        # under autocast the fp32 rotary tables promote q and k back to fp32: the attention itself runs in
        # autocast's dtype (SDPA casts to it), so that is the dtype that decides whether flash-attn can run
        device_type = q.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
        flash = self.attn_backend == 'flash' or (self.attn_backend == 'auto' and self.flash_suits(device_type, dtype))
        if flash:
            if device_type != 'cuda' or dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"attention backend 'flash' runs on CUDA in bfloat16 or float16, not on "
                                 f"{device_type} in {dtype}; use 'auto' or 'sdpa'")
            # flash-attn aligns its causal mask to the bottom right, so it is right with a cache too
            y = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), causal=True)
            return y.transpose(1, 2)
        T = q.size(2)
        if past == 0:  # query and key lengths equal: SDPA's top-left aligned is_causal is right
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if T == 1:  # one new position sees the whole cache: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        # several new positions after a cache: query i sees keys up to past + i
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
            passes = cfg.n_thoughts + 1 if cfg.n_thoughts else cfg.n_ponder + 1
            proj_std = std / math.sqrt(2 * cfg.n_layer * passes)
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
    # every pass of the thought loop. A setting of the training run (train.py), not of the model: it changes
    # no result, so it is no GPTConfig field and no checkpoint records it.
    activation_checkpointing = False

    def trunk(self, x, pos, cache=None):
        """x (B, T, C) input vectors, pos (T,) position ids -> (B, T, C) hidden states after the final LN."""
        cos = self.rope_cos[pos].to(x.dtype)  # (T, rot), broadcasts over (B, nh)
        sin = self.rope_sin[pos].to(x.dtype)
        # nothing to recompute without a backward (evaluation, decoding with its KV cache)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if cache is not None:  # decoding: the block also appends its keys and values to the cache
                x = block(x, cos, sin, cache, i)
            elif recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:  # (no layer index: compile_blocks would specialize a graph on it)
                x = block(x, cos, sin)
        if cache is not None:
            cache.pos += x.size(1)
        return self.final_layer_norm(x)

    def compile_blocks(self, **options):
        """torch.compile each Block in place (regional compilation): every pass of every method runs the same
        Block code, so the compiled graphs are reused whatever the number of passes (R) is; compiling the whole
        model instead unrolls the thought loop into one graph per R. Parameter names do not change."""
        for block in self.layers:
            block.compile(**options)

    def embed(self, idx):
        return self.embed_in(idx) * self.config.embed_scale  # (B, T, C)

    # --- forward ---

    def forward(self, idx, targets=None, n_jacobi=None):
        """idx (B, T) -> logits (B, T, V) at every position; loss if targets (B, T) is given (-1 = ignore).
        n_jacobi: PonderLM-2's Jacobi passes R, default config.n_jacobi (train.py draws R per iteration from
        jacobi_train_range and passes it here)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        if self.config.n_thoughts:
            h = self.think(idx, self.config.n_jacobi if n_jacobi is None else n_jacobi)
        elif self.config.n_ponder:
            h = self.ponder(idx)
        else:
            h = self.trunk(self.embed(idx), torch.arange(T, device=idx.device))
        logits = self.embed_out(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def think(self, idx, n_jacobi, cache=None, tol=None, on_pass=None):
        """PonderLM-2: K latent thoughts per token, computed in parallel with Jacobi iterations.

        Stage 0 holds the token vectors e_t; stage j (1..K) holds every token's j-th thought z_t^j. The
        stages are interleaved token-major into one sequence e_1 z_1^1..z_1^K e_2 z_2^1.. of (K+1)T slots,
        every slot at its token's position id, and run through the trunk f with plain causal attention.
        The thought z_t^j is f's output at the slot before it (e_t for j = 1): every pass refreshes all
        thought stages from the previous pass's outputs at once. A thought is exact once every slot before
        it is, and stage building makes the first token's thoughts exact, so each pass adds at least one
        exact thought: n_jacobi >= K(T-1) gives exactly the sequential, token-by-token computation (in
        practice the passes contract and it agrees to float precision much sooner).
        tol: adaptive Jacobi instead of n_jacobi fixed passes: stop once a pass changes the thoughts by at
        most tol relative to their size (relative_change, over the whole batch), and after K(T-1) passes at
        the latest (exact by then). tol=0 stops at the exact fixed point, a huge tol after one pass.
        cache: filled by the final pass with all (K+1)T slots (generate's prefill).
        on_pass(r, thoughts (B, T, K, C), h (B, T, C)): called with the thoughts after r = 0, 1, .. Jacobi
        passes and the hidden states that predict the next token from them (what think(idx, r) returns);
        the last call's r is the number of passes used.
        Returns the hidden state at the last thought of each token, (B, T, C): it predicts the next token.
        """
        K = self.config.n_thoughts
        e = self.embed(idx)  # (B, T, C)
        stages = [e]
        # stage building: with k+1 stages run f and append the outputs at the last stage's slots
        # (refreshing the earlier thought stages too); for K=1 this is one plain pass over the T tokens
        for _ in range(K):
            h = self.run_stages(stages)  # (B, T, S, C) with S = len(stages)
            stages = [e] + list(h.unbind(dim=2))
        # Jacobi refinement: stage j+1 <- outputs at stage-j slots, for all j at once
        max_passes = n_jacobi if tol is None else K * (idx.size(1) - 1)
        done = 0
        while done < max_passes:
            h = self.run_stages(stages)  # (B, T, K+1, C)
            if on_pass is not None:  # h[:, :, K] is what the final pass after `done` passes would return
                on_pass(done, torch.stack(stages[1:], dim=2), h[:, :, K])
            thoughts = list(h[:, :, :K].unbind(dim=2))
            converged = tol is not None and relative_change(thoughts, stages[1:]) <= tol
            stages = [e] + thoughts
            done += 1
            if converged:
                break
        h = self.run_stages(stages, cache)  # final pass
        if on_pass is not None:
            on_pass(done, torch.stack(stages[1:], dim=2), h[:, :, K])
        return h[:, :, K]  # (B, T, C): the output at each token's last thought slot

    def run_stages(self, stages, cache=None):
        """Interleave S stages of (B, T, C) token-major, run f once, return outputs as (B, T, S, C)."""
        B, T, C = stages[0].size()
        S = len(stages)
        x = torch.stack(stages, dim=2).view(B, T * S, C)  # e_1 z_1^1 .. e_2 z_2^1 ..
        pos = torch.arange(T, device=x.device).repeat_interleave(S)  # thoughts share their token's position
        return self.trunk(x, pos, cache).view(B, T, S, C)

    @torch.no_grad()
    def exact_thoughts(self, idx):
        """PonderLM-2 thoughts computed one token at a time through a KV cache, as decoding computes them: exact.
        idx (B, T) -> (thoughts (B, T, K, C), h (B, T, C)), h predicting each next token (embed_out(h) is
        sequential_logits(idx)). The reference that Jacobi passes are measured against (eval.py)."""
        B, T = idx.size()
        K = self.config.n_thoughts
        if not K:
            raise ValueError("exact_thoughts needs a PonderLM-2 model (n_thoughts > 0)")
        dtype = self.embed_in.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        cache = KVCache(self.config, B, (K + 1) * T, idx.device, dtype)
        thoughts, hs = [], []
        for t in range(T):
            pos = torch.tensor([t], device=idx.device)
            h = self.trunk(self.embed(idx[:, t:t + 1]), pos, cache)  # (B, 1, C)
            for _ in range(K):  # each thought is the previous slot's output, fed back at the same position
                thoughts.append(h)
                h = self.trunk(h, pos, cache)
            hs.append(h)
        return torch.cat(thoughts, dim=1).view(B, T, K, -1), torch.cat(hs, dim=1)

    def ponder(self, idx, caches=None):
        """PonderLM v1: N times, add the probability-weighted sum of token embeddings to the input.
        caches: one KVCache per pass (N+1) for generation, else None. Returns the last pass's hidden states."""
        B, T = idx.size()
        N, s = self.config.n_ponder, self.config.embed_scale
        past = caches[0].pos if caches else 0
        pos = torch.arange(past, past + T, device=idx.device)
        c = self.embed(idx) * (N if self.config.ponder_multiply else 1)  # (B, T, C)
        for step in range(N + 1):
            h = self.trunk(c, pos, caches[step] if caches else None)  # (B, T, C)
            if step == N:
                return h
            probs = F.softmax(self.embed_out(h), dim=-1)  # (B, T, V)
            c = c + (probs @ self.embed_in.weight) * s  # (B, T, C): the expected embedding

    # --- generation ---

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 n_jacobi=None, jacobi_tol=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. The prompt must fit in
        block_size, the new tokens need not: past it the context window slides (see generate_stream).
        n_jacobi: Jacobi passes over the prompt in the cached PonderLM-2 prefill (default config.n_jacobi), or
        jacobi_tol: as many as the prompt's thoughts need to settle to that tolerance (think's adaptive Jacobi);
        the thoughts of generated tokens, and of every window after a slide, are always exact."""
        out = [idx]
        for idx_next, _ in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, n_jacobi,
                                                jacobi_tol):
            out.append(idx_next)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        n_jacobi=None, jacobi_tol=None, on_pass=None):
        """Yield (idx_next (B, 1), logits (B, V)) for each new token: logits are what it was sampled from.

        The logits come from a window of the sequence of at most block_size tokens: no model sees more. While the
        prompt and the new tokens fit, the window is all of them. When a new token does not fit, the window slides:
        it keeps the last slide_keep() tokens (half the context), recomputes them from scratch into fresh caches,
        thoughts included and exact (prefill_exact), and grows from there again. nanoGPT's sampler instead crops
        to the last block_size tokens at every step; with a KV cache that would be a whole prefill per token,
        where a slide every block_size/2 tokens costs about one decode step per token. The uncached path crops to
        the same windows, so use_cache=False stays the exact reference of the cached path, slides included.
        n_jacobi, jacobi_tol, on_pass: the prompt's Jacobi passes in the cached prefill (see generate, think)."""
        B, T = idx.size()
        if T == 0:
            raise ValueError("generate needs at least one prompt token (e.g. the EOS token)")
        if T > self.config.block_size:
            raise ValueError(f"the prompt ({T} tokens) is longer than block_size {self.config.block_size}: "
                             f"keep its last {self.config.block_size} tokens")
        window = idx  # (B, L) with L <= block_size: the tokens the next logits are computed from
        if use_cache:
            logits, caches = self.prefill(idx, self.cache_len(T, max_new_tokens), n_jacobi, jacobi_tol, on_pass)
        else:
            logits = self.exact_logits(window)
        for i in range(max_new_tokens):
            idx_next = sample(logits.float(), temperature, top_k, top_p)  # (B, 1)
            yield idx_next, logits
            if i == max_new_tokens - 1:
                return  # nothing left to predict: the last token need not be run
            window = torch.cat((window, idx_next), dim=1)
            slide = window.size(1) > self.config.block_size
            if slide:
                window = window[:, -self.slide_keep():]
            if not use_cache:
                logits = self.exact_logits(window)
            elif slide:
                logits, caches = self.prefill_exact(window, self.cache_len(window.size(1), max_new_tokens - i))
            else:
                logits = self.decode_one(idx_next, window.size(1) - 1, caches)

    def slide_keep(self):
        """How many tokens the window keeps when it slides: half the context (at least 1), see generate_stream."""
        return max(1, self.config.block_size // 2)

    def cache_len(self, n_tokens, n_more):
        """Cache positions for n_tokens now and at most n_more to come, but never more than the context holds."""
        return min(n_tokens + n_more, self.config.block_size)

    def exact_logits(self, idx):
        """Next-token logits (B, V) recomputed from scratch with exact thoughts: the uncached reference."""
        logits, _ = self(idx, n_jacobi=self.config.n_thoughts * (idx.size(1) - 1))
        return logits[:, -1]

    @torch.no_grad()
    def sequential_logits(self, idx):
        """Teacher-forced logits (B, T, V) computed one token at a time through the KV cache, as decoding does:
        exact thoughts for the cost of about one pass (the parallel form needs K(T-1) Jacobi passes for that)."""
        logits, caches = self.prefill(idx[:, :1], idx.size(1))
        out = [logits]
        for t in range(1, idx.size(1)):
            out.append(self.decode_one(idx[:, t:t + 1], t, caches))
        return torch.stack(out, dim=1)

    def prefill(self, idx, max_len, n_jacobi=None, jacobi_tol=None, on_pass=None):
        """Run the prompt (B, T) into fresh KV caches with room for max_len tokens. PonderLM-2 computes the prompt's
        thoughts with n_jacobi passes (default config.n_jacobi), or adaptively to jacobi_tol; on_pass as in think.
        Returns next-token logits (B, V) and the caches (one per pass for PonderLM v1, else one)."""
        B, T = idx.size()
        cfg = self.config
        dtype = self.embed_in.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        slots = (cfg.n_thoughts + 1) * max_len  # PonderLM-2 caches every thought slot too
        caches = [KVCache(cfg, B, slots, idx.device, dtype) for _ in range(cfg.n_ponder + 1)]
        if cfg.n_ponder:  # every pass is causal, so each pass's cache can be extended on its own
            h = self.ponder(idx, caches)
        elif cfg.n_thoughts:  # the prompt's thoughts as in forward(); the final pass fills the cache
            h = self.think(idx, cfg.n_jacobi if n_jacobi is None else n_jacobi, caches[0], jacobi_tol, on_pass)
        else:
            h = self.trunk(self.embed(idx), torch.arange(T, device=idx.device), caches[0])
        return self.embed_out(h[:, -1]), caches

    def prefill_exact(self, idx, max_len):
        """prefill() with exact thoughts, for the window after a slide. Vanilla and PonderLM v1 have no thoughts:
        their prefill is exact already. PonderLM-2 runs the tokens through the fresh cache one at a time, exactly as
        decoding computed them: T decode steps, the FLOPs of one pass. The parallel alternative, think() with
        K(T-1) Jacobi passes, is exact too but costs K(T-1) passes over (K+1)T slots, quadratic in T."""
        if not self.config.n_thoughts:
            return self.prefill(idx, max_len)
        logits, caches = self.prefill(idx[:, :1], max_len, n_jacobi=0)  # one token: stage building is exact
        for t in range(1, idx.size(1)):
            logits = self.decode_one(idx[:, t:t + 1], t, caches)
        return logits, caches

    def decode_one(self, idx_next, t, caches):
        """Feed one new token (B, 1) at position t through the caches; return next-token logits (B, V)."""
        if self.config.n_ponder:
            h = self.ponder(idx_next, caches)
        else:
            # PonderLM-2: the token, then K single-position forwards of the previous output, all at position t
            pos = torch.tensor([t], device=idx_next.device)
            h = self.trunk(self.embed(idx_next), pos, caches[0])  # (B, 1, C)
            for _ in range(self.config.n_thoughts):
                h = self.trunk(h, pos, caches[0])
        return self.embed_out(h[:, -1])

    # --- FLOPs ---

    def flops_per_token(self, training=True, seq_len=None):
        """FLOPs per real token of one training step (forward + backward = 3x forward) or one eval forward,
        counting every trunk pass over its (stages x T) slots, the attention over that length, and the
        vocabulary projections. Matmuls only (2 FLOPs per multiply-add), as in the PaLM appendix."""
        cfg = self.config
        T = seq_len or cfg.block_size
        L, H, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
        n_inner = cfg.n_inner or 4 * H
        trunk_params = L * (4 * H * H + 2 * H * n_inner)

        def slot_flops(context):  # one trunk position: weight matmuls + q.k and attn.v over the context
            return 2 * trunk_params + 4 * L * H * context

        head = 2 * H * V
        if cfg.n_thoughts:
            K = cfg.n_thoughts
            R = sum(cfg.jacobi_train_range) / 2 if training else cfg.n_jacobi
            # stage building with S = 1..K stages, then R refinement passes and the final pass with K+1
            fwd = sum(S * slot_flops(S * T) for S in range(1, K + 1))
            fwd += (R + 1) * (K + 1) * slot_flops((K + 1) * T) + head
        elif cfg.n_ponder:
            N = cfg.n_ponder
            # N+1 passes, N+1 vocabulary projections and N probability-weighted embedding sums
            fwd = (N + 1) * (slot_flops(T) + head) + N * head
        else:
            fwd = slot_flops(T) + head
        return 3 * fwd if training else fwd

    def estimate_mfu(self, tokens_per_sec, peak_flops=None):
        """Model FLOPs utilization of training at tokens_per_sec (real tokens, all GPUs of this process),
        against peak_flops or the bf16 peak of the current CUDA device; None when unknown (e.g. CPU)."""
        if peak_flops is None:
            peak_flops = device_peak_flops()
        if not peak_flops:
            return None
        return self.flops_per_token(training=True) * tokens_per_sec / peak_flops

    # --- Hugging Face checkpoints ---

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """A GPT-NeoX / Pythia / PonderLM checkpoint in Hugging Face format: a local directory with
        config.json and model.safetensors / pytorch_model.bin (or a sharded index), or a hub id.
        overrides replace GPTConfig fields (e.g. n_jacobi=5). The model is fp32 on the CPU."""
        path = name_or_dir if os.path.isdir(name_or_dir) else download_from_hub(name_or_dir)
        config_file = os.path.join(path, 'config.json')
        try:
            with open(config_file, encoding='utf-8') as f:
                hf = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise ValueError(f"{config_file} is not JSON ({e})") from None
        config = config_from_hf(hf)
        unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known: {[f.name for f in fields(GPTConfig)]}")
        config = replace(config, **overrides)
        model = cls.unloaded(config)
        load_hf_weights(model, read_state_dict(path))
        return model

    def save_pretrained(self, directory, tokenizer_path=None, eos_token='<|endoftext|>'):
        """Write a Hugging Face GPT-NeoX directory that from_pretrained reads back: config.json (hf_config: the
        method's keys in the official spelling), model.safetensors (fp32, Hugging Face names) and, given
        tokenizer_path, its tokenizer.json with a tokenizer_config.json. A vanilla model's embedding scale is
        folded into embed_in (and scale_embeds written false), so stock transformers computes the same logits;
        a PonderLM model keeps scale_embeds as the official code reads it. Files are written whole or not at all."""
        from safetensors.torch import save as safetensors_bytes
        config, eos_id = self.config, 0
        if tokenizer_path is not None:
            from tokenizers import Tokenizer
            eos_id = Tokenizer.from_file(tokenizer_path).token_to_id(eos_token)
            if eos_id is None:
                raise ValueError(f"tokenizer {tokenizer_path} has no {eos_token} token")
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        if not (config.n_thoughts or config.n_ponder) and config.scale_embeds:
            sd['embed_in.weight'] = sd['embed_in.weight'] * config.embed_scale
            config = replace(config, scale_embeds=False)
        sd = {(k if k == 'embed_out.weight' else 'gpt_neox.' + k): v for k, v in sd.items()}
        os.makedirs(directory, exist_ok=True)
        write_whole(os.path.join(directory, 'model.safetensors'), safetensors_bytes(sd, metadata={'format': 'pt'}))
        write_json(os.path.join(directory, 'config.json'), hf_config(config, eos_id))
        if tokenizer_path is not None:
            with open(tokenizer_path, 'rb') as f:
                write_whole(os.path.join(directory, 'tokenizer.json'), f.read())
            write_json(os.path.join(directory, 'tokenizer_config.json'), {
                'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': eos_token, 'eos_token': eos_token,
                'unk_token': eos_token, 'model_max_length': config.block_size})

    @classmethod
    def from_state_dict(cls, config, state_dict):
        """A model from the weights of a train.py checkpoint (a compiled or DDP model saves them under a prefix)."""
        model = cls.unloaded(config)
        model.load_state_dict({k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in state_dict.items()})
        return model

    @classmethod
    def unloaded(cls, config):
        """A model on the CPU with uninitialized weights, for loading: no time spent on a random init."""
        with torch.device('meta'):
            model = cls(config)
        model.to_empty(device='cpu')
        model.init_rope()  # the rotary tables are non-persistent buffers, in no checkpoint
        return model


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


def relative_change(new, old):
    """||new - old|| / ||new|| over all of two lists of tensors (the thought stages of a batch), as a float:
    how much a Jacobi pass moved the thoughts (think's tol)."""
    diff = sum(((a.float() - b.float()) ** 2).sum() for a, b in zip(new, old))
    size = sum((a.float() ** 2).sum() for a in new)
    return (diff / size.clamp_min(1e-30)).sqrt().item()


def device_peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# -----------------------------------------------------------------------------
# loading Hugging Face checkpoints

REQUIRED = object()  # config_from_hf: a key without a default
HF_KINDS = {  # config.json value kinds: (test, what it must be)
    'size': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, 'an integer >= 1'),
    'count': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, 'an integer >= 0'),
    'positive': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, 'a number > 0'),
    'fraction': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                 'a number in (0, 1]'),
    'flag': (lambda v: isinstance(v, bool), 'true or false (unquoted)'),
    'text': (lambda v: isinstance(v, str), 'a string'),
    'object': (lambda v: isinstance(v, dict), 'a JSON object'),
    'range': (lambda v: isinstance(v, list) and len(v) == 2 and all(HF_KINDS['count'][0](x) for x in v),
              'a list of two integers >= 0'),
}


def checked(key, value, kind):
    """value of config.json's key, if it is of kind (HF_KINDS); else a ValueError naming the key."""
    ok, what = HF_KINDS[kind]
    if not ok(value):
        raise ValueError(f"config.json has {key}={json.dumps(value)}, but it must be {what}")
    return value


def config_from_hf(hf):
    """GPTConfig from a GPT-NeoX config.json (a dict; old and new key names), with the method keys of the
    official PonderLM-2 / PonderingLM code: num_latent_thoughts, num_jacobi_iterations, random_jacobi_iterations,
    interpolation, interpolation_use_topk, scale_embeds, recurrent_model, ponderinglm, pondering_steps,
    mutiply_pondering_steps (sic); and jacobi_train_range, which only our export writes. A missing or mistyped
    field, or a value that would compute something this model does not, is a ValueError naming the key."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds a JSON {type(hf).__name__}, not an object of GPT-NeoX keys")

    def get(key, default=REQUIRED, kind='size'):
        if hf.get(key) is None:  # absent, or null
            if default is REQUIRED:
                raise ValueError(f"config.json lacks {key}: it is no GPT-NeoX config")
            return default
        return checked(key, hf[key], kind)

    model_type = get('model_type', 'gpt_neox', 'text')
    if model_type != 'gpt_neox':
        raise ValueError(f"model_type {model_type!r} is not supported: this model is GPT-NeoX (Pythia), 'gpt_neox'")
    act = get('hidden_act', 'gelu', 'text')
    if act != 'gelu':
        raise ValueError(f"hidden_act {act!r} is not supported: only the exact 'gelu' of GPT-NeoX/Pythia")
    # The official default of interpolation is True, but the official loader writes it into every config.json
    # it saves; a config without it is a stock GPT-NeoX one, which has no interpolation.
    if get('interpolation', False, 'flag'):
        raise ValueError("interpolation=true (thoughts as probability-weighted token embeddings) is not supported "
                         "by this implementation: only PonderLM-2's interpolation=false (the hidden state itself)")
    # Ignored, as they change no logits: interpolation_use_topk (the official code reads it only with
    # interpolation on); recurrent_model (its loader's "pondering on" switch, true for every method but
    # vanilla, which its GPT-NeoX PonderLM-2 model never reads); output_hidden_states; classifier_dropout.
    if not get('attention_bias', True, 'flag'):
        raise ValueError("attention_bias=false is not supported: GPT-NeoX has biases everywhere")
    rope = get('rope_parameters', None, 'object') or get('rope_scaling', None, 'object') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
        raise ValueError(f"rope type {rope_type!r} is not supported, only 'default'")
    rotary_pct = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', hf.get('rotary_pct', 0.25)))
    rotary_base = rope.get('rope_theta', hf.get('rope_theta', hf.get('rotary_emb_base', 10000)))
    n_head, n_embd = get('num_attention_heads'), get('hidden_size')
    if n_embd % n_head:
        raise ValueError(f"config.json has hidden_size={n_embd}, not divisible by num_attention_heads={n_head}")
    n_thoughts = get('num_latent_thoughts', 0, 'count')
    n_ponder = get('pondering_steps', 0, 'count') if get('ponderinglm', False, 'flag') else 0
    n_jacobi = get('num_jacobi_iterations', 3, 'count')
    # released checkpoints say only whether R was random in training: ours draws from {2,3,4} then
    train_range = (2, 4) if get('random_jacobi_iterations', True, 'flag') else (n_jacobi, n_jacobi)
    # scale_embeds scales what a pondering model feeds back; the official vanilla baseline is stock GPT-NeoX,
    # which has no embedding scale whatever its config.json says (the official loader writes the key anyway)
    scale_embeds = get('scale_embeds', False, 'flag') and bool(n_thoughts or n_ponder)
    return GPTConfig(
        block_size=get('max_position_embeddings', 2048),
        vocab_size=get('vocab_size'),
        n_layer=get('num_hidden_layers'),
        n_head=n_head,
        n_embd=n_embd,
        n_inner=get('intermediate_size', None),
        rotary_pct=float(checked('rotary_pct', rotary_pct, 'fraction')),
        rotary_base=float(checked('rotary_emb_base', rotary_base, 'positive')),
        parallel_residual=get('use_parallel_residual', True, 'flag'),
        layer_norm_eps=get('layer_norm_eps', 1e-5, 'positive'),
        n_thoughts=n_thoughts,
        n_jacobi=n_jacobi,
        jacobi_train_range=tuple(get('jacobi_train_range', train_range, 'range')),
        n_ponder=n_ponder,
        ponder_multiply=get('mutiply_pondering_steps', False, 'flag'),  # (sic) the released key
        scale_embeds=scale_embeds,
    )


def hf_config(config, eos_id=0):
    """A GPT-NeoX config.json (dict) for config, in the key names of Pythia's released configs, plus the method
    keys in the official code's spelling (config_from_hf reads it back). Stock transformers reads the
    GPT-NeoX part; the method keys are extra attributes it keeps but does not act on."""
    lo, hi = config.jacobi_train_range
    return {
        'architectures': ['GPTNeoXForCausalLM'],
        'model_type': 'gpt_neox',
        'vocab_size': config.vocab_size,
        'hidden_size': config.n_embd,
        'num_hidden_layers': config.n_layer,
        'num_attention_heads': config.n_head,
        'intermediate_size': config.n_inner or 4 * config.n_embd,
        'max_position_embeddings': config.block_size,
        'rotary_pct': config.rotary_pct,
        'rotary_emb_base': config.rotary_base,
        'use_parallel_residual': config.parallel_residual,
        'layer_norm_eps': config.layer_norm_eps,
        'hidden_act': 'gelu',
        'attention_bias': True,
        'tie_word_embeddings': False,
        'initializer_range': 0.02,
        'bos_token_id': eos_id,
        'eos_token_id': eos_id,
        'use_cache': True,
        'torch_dtype': 'float32',
        # PonderLM-2
        'num_latent_thoughts': config.n_thoughts,
        'num_jacobi_iterations': config.n_jacobi,
        'random_jacobi_iterations': lo < hi,
        'jacobi_train_range': [lo, hi],
        'interpolation': False,
        'interpolation_use_topk': False,
        'recurrent_model': bool(config.n_thoughts or config.n_ponder),  # the official "pondering on" switch
        # PonderingLM (v1)
        'ponderinglm': config.n_ponder > 0,
        'pondering_steps': config.n_ponder,
        'mutiply_pondering_steps': config.ponder_multiply,  # (sic) the official key
        # both
        'scale_embeds': config.scale_embeds,
    }


def write_whole(path, data):
    """Write bytes to a temp file, flushed to disk, then rename it to path: a reader (or a crash) sees the old file or
    the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    write_whole(path, (json.dumps(obj, indent=2) + '\n').encode())


def download_from_hub(repo_id):
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id!r} is not a local directory, and huggingface_hub (needed to download it) "
                           "is not installed: pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=['*.json', '*.safetensors'])
        if not any(f.endswith('.safetensors') for f in os.listdir(path)):
            path = snapshot_download(repo_id, allow_patterns=['*.json', '*.bin'])
    except Exception as e:
        offline = ': offline (HF_HUB_OFFLINE) and not in the cache' if constants.HF_HUB_OFFLINE else ''
        why = type(e).__name__ + offline
        raise RuntimeError(f"could not get {repo_id!r} from the Hugging Face Hub ({why}); "
                           "check the name and your connection, or pass a local directory") from None
    return path


def read_state_dict(path):
    """All tensors of a checkpoint directory: single or sharded, safetensors or PyTorch pickles. A missing,
    damaged or foreign file is an OSError or ValueError that names it."""
    for index_name, single in (('model.safetensors.index.json', 'model.safetensors'),
                               ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        index = os.path.join(path, index_name)
        files = [single]
        if os.path.exists(index):
            try:
                with open(index, encoding='utf-8') as f:
                    files = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is no sharded-weights index (a JSON object with a weight_map): "
                                 f"{type(e).__name__}: {e}") from None
        elif not os.path.exists(os.path.join(path, single)):
            continue
        sd = {}
        for name in files:
            sd.update(read_weights_file(os.path.join(path, str(name))))
        return sd
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or sharded index in {path}")


def read_weights_file(file):
    """The tensors of one weights file, by name."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"the weights file {file} is missing")
    try:
        if file.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(file)
        else:
            sd = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors alike; torch's advice (weights_only=False) is unsafe
        raise ValueError(f"cannot read the weights file {file} ({type(e).__name__}): it is damaged (cut short?) "
                         f"or no weights file; copy or download it again") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{file} holds no state dict (names -> tensors)")
    return sd


UNUSED_OFFICIAL_WEIGHTS = ('adapter.weight',)  # the official PonderingLM code makes nn.Linear(2H, H) and never uses it


def load_hf_weights(model, sd):
    """Copy a GPTNeoXForCausalLM state dict into our model (same module names, 'gpt_neox.' dropped). The
    official PonderingLM code's unused adapter.weight is skipped, with one note on stderr."""
    ignored = ('.attention.bias', '.attention.masked_bias', '.rotary_emb.inv_freq')  # buffers we recompute
    sd = {k.removeprefix('gpt_neox.'): v for k, v in sd.items() if not k.endswith(ignored)}
    unused = [k for k in UNUSED_OFFICIAL_WEIGHTS if k in sd]
    if unused:
        print(f"note: ignoring {', '.join(unused)}: a layer the official PonderingLM code creates and never uses",
              file=sys.stderr)
        sd = {k: v for k, v in sd.items() if k not in unused}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, p in ours.items():
            if sd[k].shape != p.shape:
                raise ValueError(f"checkpoint weight {k} has shape {tuple(sd[k].shape)}, model expects {tuple(p.shape)}")
            p.copy_(sd[k])  # copy_ casts, so bf16 checkpoints load into fp32 models and back
