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
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

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
        raise ValueError(f"unknown method {name!r}; use vanilla, ponderlm2-kK or ponderlm1-nN "
                         f"(e.g. ponderlm2-k1, ponderlm1-n3)")
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

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)

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
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, past + T, hs)."""
        T = q.size(2)
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            # flash-attn aligns its causal mask to the bottom right, so it is right with a cache too
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return y.transpose(1, 2)
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

    def trunk(self, x, pos, cache=None):
        """x (B, T, C) input vectors, pos (T,) position ids -> (B, T, C) hidden states after the final LN."""
        cos = self.rope_cos[pos].to(x.dtype)  # (T, rot), broadcasts over (B, nh)
        sin = self.rope_sin[pos].to(x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += x.size(1)
        return self.final_layer_norm(x)

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

    def think(self, idx, n_jacobi, cache=None):
        """PonderLM-2: K latent thoughts per token, computed in parallel with Jacobi iterations.

        Stage 0 holds the token vectors e_t; stage j (1..K) holds every token's j-th thought z_t^j. The
        stages are interleaved token-major into one sequence e_1 z_1^1..z_1^K e_2 z_2^1.. of (K+1)T slots,
        every slot at its token's position id, and run through the trunk f with plain causal attention.
        The thought z_t^j is f's output at the slot before it (e_t for j = 1): every pass refreshes all
        thought stages from the previous pass's outputs at once. A thought is exact once every slot before
        it is, and stage building makes the first token's thoughts exact, so each pass adds at least one
        exact thought: n_jacobi >= K(T-1) gives exactly the sequential, token-by-token computation (in
        practice the passes contract and it agrees to float precision much sooner).
        cache: filled by the final pass with all (K+1)T slots (generate's prefill).
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
        for _ in range(n_jacobi):
            h = self.run_stages(stages)  # (B, T, K+1, C)
            stages = [e] + list(h[:, :, :K].unbind(dim=2))
        h = self.run_stages(stages, cache)  # final pass
        return h[:, :, K]  # (B, T, C): the output at each token's last thought slot

    def run_stages(self, stages, cache=None):
        """Interleave S stages of (B, T, C) token-major, run f once, return outputs as (B, T, S, C)."""
        B, T, C = stages[0].size()
        S = len(stages)
        x = torch.stack(stages, dim=2).view(B, T * S, C)  # e_1 z_1^1 .. e_2 z_2^1 ..
        pos = torch.arange(T, device=x.device).repeat_interleave(S)  # thoughts share their token's position
        return self.trunk(x, pos, cache).view(B, T, S, C)

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
                 n_jacobi=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
        n_jacobi: Jacobi passes over the prompt in the cached PonderLM-2 prefill (default config.n_jacobi);
        the thoughts of generated tokens are always exact."""
        out = [idx]
        for idx_next, _ in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, n_jacobi):
            out.append(idx_next)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        n_jacobi=None):
        """Yield (idx_next (B, 1), logits (B, V)) for each new token: logits are what it was sampled from."""
        B, T = idx.size()
        if T == 0:
            raise ValueError("generate needs at least one prompt token (e.g. the EOS token)")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"{self.config.block_size}: shorten the prompt or ask for fewer tokens")
        if use_cache:
            logits, caches = self.prefill(idx, T + max_new_tokens, n_jacobi)
        for i in range(max_new_tokens):
            if not use_cache:
                logits = self.exact_logits(idx)
            elif i > 0:
                logits = self.decode_one(idx_next, T + i - 1, caches)
            idx_next = sample(logits.float(), temperature, top_k, top_p)  # (B, 1)
            yield idx_next, logits
            if not use_cache:
                idx = torch.cat((idx, idx_next), dim=1)

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

    def prefill(self, idx, max_len, n_jacobi=None):
        """Run the prompt (B, T) into fresh KV caches with room for max_len tokens.
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
            h = self.think(idx, cfg.n_jacobi if n_jacobi is None else n_jacobi, caches[0])
        else:
            h = self.trunk(self.embed(idx), torch.arange(T, device=idx.device), caches[0])
        return self.embed_out(h[:, -1]), caches

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
        with open(os.path.join(path, 'config.json')) as f:
            hf = json.load(f)
        config = config_from_hf(hf)
        unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known: {[f.name for f in fields(GPTConfig)]}")
        config = replace(config, **overrides)
        model = cls.unloaded(config)
        load_hf_weights(model, read_state_dict(path))
        return model

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
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -float('inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


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

def config_from_hf(hf):
    """GPTConfig from a GPT-NeoX config.json (old and new key names, and the PonderLM keys)."""
    act = hf.get('hidden_act', 'gelu')
    if act != 'gelu':
        raise ValueError(f"hidden_act {act!r} is not supported: only the exact 'gelu' of GPT-NeoX/Pythia")
    if hf.get('interpolation'):
        raise ValueError("interpolation=True (thought interpolation) is not supported by this implementation")
    if not hf.get('attention_bias', True):
        raise ValueError("attention_bias=False is not supported: GPT-NeoX has biases everywhere")
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    if rope.get('rope_type', rope.get('type', 'default')) != 'default':
        raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported, only 'default'")
    rotary_pct = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', hf.get('rotary_pct', 0.25)))
    rotary_base = rope.get('rope_theta', hf.get('rope_theta', hf.get('rotary_emb_base', 10000)))
    n_ponder = hf.get('pondering_steps', 0) if hf.get('ponderinglm') else 0
    n_jacobi = hf.get('num_jacobi_iterations', 3)
    return GPTConfig(
        block_size=hf.get('max_position_embeddings', 2048),
        vocab_size=hf['vocab_size'],
        n_layer=hf['num_hidden_layers'],
        n_head=hf['num_attention_heads'],
        n_embd=hf['hidden_size'],
        n_inner=hf.get('intermediate_size'),
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        parallel_residual=hf.get('use_parallel_residual', True),
        layer_norm_eps=hf.get('layer_norm_eps', 1e-5),
        n_thoughts=hf.get('num_latent_thoughts', 0) or 0,
        n_jacobi=n_jacobi,
        # released checkpoints say only whether R was random in training: ours draws from {2,3,4} then
        jacobi_train_range=(2, 4) if hf.get('random_jacobi_iterations', True) else (n_jacobi, n_jacobi),
        n_ponder=n_ponder or 0,
        ponder_multiply=bool(hf.get('mutiply_pondering_steps', False)),  # (sic) the released key
        scale_embeds=bool(hf.get('scale_embeds', False)),  # stock Pythia does not scale
    )


def download_from_hub(repo_id):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id!r} is not a local directory, and huggingface_hub (needed to download it) "
                           "is not installed: pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=['*.json', '*.safetensors'])
        if not any(f.endswith('.safetensors') for f in os.listdir(path)):
            path = snapshot_download(repo_id, allow_patterns=['*.json', '*.bin'])
    except Exception as e:
        raise RuntimeError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                           "check the name and your connection, or pass a local directory") from None
    return path


def read_state_dict(path):
    """All tensors of a checkpoint directory: single or sharded, safetensors or PyTorch pickles."""
    for index_name, single in (('model.safetensors.index.json', 'model.safetensors'),
                               ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        index = os.path.join(path, index_name)
        files = [single]
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)['weight_map'].values()))
        elif not os.path.exists(os.path.join(path, single)):
            continue
        sd = {}
        for name in files:
            sd.update(read_weights_file(os.path.join(path, name)))
        return sd
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or sharded index in {path}")


def read_weights_file(file):
    if file.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(file)
    return torch.load(file, map_location='cpu', weights_only=True)


def load_hf_weights(model, sd):
    """Copy a GPTNeoXForCausalLM state dict into our model (same module names, 'gpt_neox.' dropped)."""
    ignored = ('.attention.bias', '.attention.masked_bias', '.rotary_emb.inv_freq')  # buffers we recompute
    sd = {k.removeprefix('gpt_neox.'): v for k, v in sd.items() if not k.endswith(ignored)}
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
