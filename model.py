"""
One GPT-NeoX (the Pythia architecture) with the ways to spend more compute per token that the PonderLM papers
compare, each a short method over the same trunk (at most one count is set):

  vanilla     (no count)     the plain language model
  PonderLM-2  n_thoughts=K   K latent thoughts per token: the last hidden state fed back as the next input,
                             x1 z1 x2 z2 ... (arXiv 2509.23184)
  PonderLM    n_ponder=N     N steps, each adding the expected token embedding to the input (arXiv 2505.20674)
  Pause       n_pause=K      K copies of a learned pause embedding after every token
  Loop        n_loop=K       the layer stack run K+1 times with the same weights
  Hidden      n_hidden=N     N steps, each adding the last hidden state to the input

It imports only torch: copy it into another project and it works.

    model = GPT(GPTConfig.preset('pythia-70m', n_thoughts=1))
    logits, loss = model(idx, targets)                            # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens=50, temperature=0)   # exact thoughts through a KV cache
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# Pythia sizes: (n_layer, n_head, n_embd); every one has vocab 50304, context 2048, rotary_pct 0.25
PRESETS = {'pythia-14m': (6, 4, 128), 'pythia-31m': (6, 8, 256), 'pythia-70m': (6, 8, 512),
           'pythia-160m': (12, 12, 768), 'pythia-410m': (24, 16, 1024), 'pythia-1b': (16, 8, 2048),
           'pythia-1.4b': (24, 16, 2048), 'pythia-2.8b': (32, 32, 2560)}


@dataclass
class GPTConfig:
    block_size: int = 2048          # tokens of context
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    n_inner: int = None             # MLP width; None -> 4 * n_embd
    rotary_pct: float = 0.25        # share of each head's dims with rotary embeddings
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x))
    layer_norm_eps: float = 1e-5
    n_thoughts: int = 0             # PonderLM-2: K thoughts per token
    n_jacobi: int = 3               # PonderLM-2: Jacobi passes R of the forward by default
    n_ponder: int = 0               # PonderLM: N steps
    ponder_multiply: bool = False   # PonderLM: the first input embeddings times N
    n_pause: int = 0                # Pause: K slots after every token
    pause_token_id: int = 50288     # Pause: the embedding row of the pause vector
    n_loop: int = 0                 # Loop: K extra runs of the layer stack
    n_hidden: int = 0               # Hidden: N steps
    scale_embeds: bool = True       # see embed_scale
    embed_scale_rule: str = 'official'  # see embed_scale: 'official', or one for all: sqrt2.5H | sqrtH | one | '4.0'
    weight_init: str = 'small'      # 'small' (the papers') or 'normal' (normal(0, 0.02), stock Pythia)
    init_shrink_passes: int = 0     # 'small': output projections shrunk as for this many passes; 0 = passes

    def __post_init__(self):
        counts = {k: getattr(self, k) for k in METHOD_COUNTS}
        if sum(v > 0 for v in counts.values()) > 1:
            raise ValueError(f"{' and '.join(k for k, v in counts.items() if v)} are different methods: set at most "
                             f"one of {', '.join(METHOD_COUNTS)} > 0")
        for k, v in {**counts, 'n_jacobi': self.n_jacobi}.items():
            if v < 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        if self.n_pause and not 0 <= self.pause_token_id < self.vocab_size:
            raise ValueError(f"pause_token_id {self.pause_token_id} is no row of the embedding (vocab_size "
                             f"{self.vocab_size})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.weight_init not in ('small', 'normal'):
            raise ValueError(f"weight_init must be 'small' or 'normal', got {self.weight_init!r}")
        rule = self.embed_scale_rule
        if rule not in ('official', *EMBED_SCALES) and not 0 < _number(rule) < math.inf:
            raise ValueError(f"embed_scale_rule must be official, {', '.join(EMBED_SCALES)} or a number > 0, got "
                             f"{rule!r}")
        if rule != 'official' and not self.scale_embeds:
            raise ValueError("scale_embeds=False is the official rule's 'one': set embed_scale_rule, not both")
        if self.init_shrink_passes < 0 or self.init_shrink_passes and self.weight_init != 'small':
            raise ValueError(f"init_shrink_passes must be >= 0 and set only with weight_init='small' (the shrink is "
                             f"its), got {self.init_shrink_passes} with {self.weight_init!r}")

    @property
    def method(self):
        """'vanilla', 'ponderlm2-kK', 'ponderlm1-nN', 'pause-kK', 'loop-kK' or 'hidden-nN'."""
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
        return cls(**{**dict(zip(('n_layer', 'n_head', 'n_embd'), PRESETS[name])), **overrides})

    @property
    def embed_scale(self):
        """The input embeddings' factor: each method's official one, or embed_scale_rule's for all."""
        if self.embed_scale_rule != 'official':
            rule = EMBED_SCALES.get(self.embed_scale_rule)
            return rule(self.n_embd) if rule else _number(self.embed_scale_rule)
        if self.n_loop:
            return math.sqrt(2.5 * self.n_embd)
        if self.n_hidden or not self.scale_embeds:
            return 1.0
        return math.sqrt((2.5 if self.n_thoughts else 1.0) * self.n_embd)

    @property
    def passes(self):
        """Trunk passes per token: 1 for vanilla and Pause, K+1 or N+1 for the others."""
        return max(self.n_thoughts, self.n_ponder, self.n_loop, self.n_hidden) + 1

    @property
    def n_caches(self):
        """KV caches of decoding: one per pass where each pass has its own inputs (PonderLM, Hidden, Loop)."""
        return self.passes if self.n_ponder or self.n_hidden or self.n_loop else 1

    @property
    def slots(self):
        """Positions per token in the sequence the trunk sees: K+1 with thoughts or pauses."""
        return self.n_thoughts + self.n_pause + 1


# embed_scale_rule: one method's factor for all, of the width H
EMBED_SCALES = {'sqrt2.5H': lambda H: math.sqrt(2.5 * H), 'sqrtH': math.sqrt, 'one': lambda H: 1.0}


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# the count that chooses a method -> its short name and its name for people
METHOD_NAMES = {'n_thoughts': ('ponderlm2-k', 'PonderLM-2 K='), 'n_ponder': ('ponderlm1-n', 'PonderLM N='),
                'n_pause': ('pause-k', 'Pause K='), 'n_loop': ('loop-k', 'Loop K='),
                'n_hidden': ('hidden-n', 'Hidden N=')}
METHOD_COUNTS = tuple(METHOD_NAMES)


# -----------------------------------------------------------------------------
# the GPT-NeoX block

def apply_rotary_(x, cos, sin):
    """Rotate the first cos.size(-1) dims of x (..., hs) in place (rotate-half); the rest pass through."""
    x_rot = x[..., :cos.size(-1)]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot.copy_(x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin)  # in the tables' dtype, rounded once to x's
    return x


class KVCache:
    """Keys and values k, v (n_layer, B, n_head, max_len, head_size), allocated once; `pos` slots are filled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k, self.v = (torch.empty(shape, device=device, dtype=dtype) for _ in range(2))
        self.pos = 0
        self.skipped = self.stopped = 0  # adaptive thoughts: slots that reused keys, tokens that stopped early

    def append(self, layer, k, v):
        """Write k, v (B, nh, T, hs) after the filled slots; return all keys and values so far."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.size(3)} slots")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reuse_last(self, rows):
        """rows (B,) bool: their last slot written takes the keys and values of the slot before it (no host sync)."""
        if self.pos > self.k.size(3):
            raise RuntimeError(f"KV cache overflow: {self.pos} > {self.k.size(3)} slots")
        p, keep = self.pos - 1, rows[None, :, None, None]
        self.k[:, :, :, p] = torch.where(keep, self.k[:, :, :, p - 1], self.k[:, :, :, p])
        self.v[:, :, :, p] = torch.where(keep, self.v[:, :, :, p - 1], self.v[:, :, :, p])
        self.skipped = self.skipped + rows.sum()


def causal_attention(q, k, v, past=0):
    """q (B, nh, T, hs) over k, v (B, nh, past + T, hs), query i seeing keys up to past + i -> (B, nh, T, hs)."""
    T = q.size(2)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T == 1:  # one new position sees the whole cache
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.attend = causal_attention  # a seam: nanoponder/kernels.py installs faster kernels here

    def forward(self, x, cos, sin, cache=None, layer=0, kv_index=None):
        B, T, C = x.size()
        # HF's fused layout is per head: the 3C output rows are grouped [head, (q, k, v), head_size]
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3, self.head_size)
        apply_rotary_(qkv[:, :, :, :2], cos, sin)  # q and k at once, with cos, sin (T, 1, 1, rot)
        q, kv = qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1:]  # (B, nh, T, hs), (B, T, nh, 2, hs)
        if kv_index is not None:  # (B * T,): the slot of the batch whose keys and values each shows (thought dropout)
            kv = kv.flatten(0, 1)[kv_index].view(B, T, self.n_head, 2, self.head_size)
        k, v = kv.transpose(1, 2).unbind(dim=3)  # each (B, nh, T, hs)
        past = cache.pos if cache is not None else 0
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, past + T, hs)
        y = self.attend(q, k, v, past)  # (B, nh, T, hs)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.dense_h_to_4h = nn.Linear(config.n_embd, n_inner)
        self.dense_4h_to_h = nn.Linear(n_inner, config.n_embd)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0, kv_index=None):
        attn = self.attention(self.input_layernorm(x), cos, sin, cache, layer, kv_index)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


def cross_entropy(logits, targets):
    """The mean cross-entropy of logits (N, V) against targets (N,) in float32; -1 = ignore."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names follow Hugging Face's GPTNeoXForCausalLM, so checkpoints map one to one
        self.embed_in = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.cross_entropy = cross_entropy  # a seam: nanoponder/kernels.py installs a chunked loss here
        self.register_buffer('rope_cos', torch.empty(0), persistent=False)
        self.register_buffer('rope_sin', torch.empty(0), persistent=False)
        self.init_rope()
        self._init_weights()

    def init_rope(self):
        """cos/sin tables (block_size, rot) for the rotate-half rotary embedding on rot dims per head."""
        rot = int(self.config.n_embd // self.config.n_head * self.config.rotary_pct)
        device = self.embed_in.weight.device
        inv_freq = 1.0 / (self.config.rotary_base ** (torch.arange(0, rot, 2, device=device).float() / rot))
        freqs = torch.outer(torch.arange(self.config.block_size, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, rot)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def _init_weights(self):
        cfg = self.config
        if cfg.weight_init == 'normal':  # stock Hugging Face init
            std = proj_std = 0.02
        else:  # the papers': sqrt(2/(5H)), output projections also shrunk by depth times passes per token
            std = math.sqrt(2 / (5 * cfg.n_embd))
            proj_std = std / math.sqrt(2 * cfg.n_layer * (cfg.init_shrink_passes or cfg.passes))
        for name, module in self.named_modules():  # (LayerNorms keep their init: ones and zeros)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = proj_std if name.endswith(('attention.dense', 'dense_4h_to_h')) else std
                if cfg.weight_init == 'normal':
                    nn.init.normal_(module.weight, 0.0, s)
                else:
                    nn.init.trunc_normal_(module.weight, 0.0, s, a=-3 * s, b=3 * s)
                if getattr(module, 'bias', None) is not None:
                    nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out embed_in and embed_out (the Pythia paper's convention)."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.embed_in.weight.numel() + self.embed_out.weight.numel() if non_embedding else 0)

    # --- the trunk f: the layer stack and the final LayerNorm ---
    activation_checkpointing = False  # recompute each Block in backward (a setting of the run)
    jacobi_grad_passes = 0  # PonderLM-2: G >= 1 backpropagates through the last G passes only
    think_threshold = 1.0  # decoding: a token stops thinking once a readout is surer than this (1: never)

    def trunk(self, x, pos, cache=None, kv_index=None):
        """x (B, T, C) input vectors at position ids pos (T,) -> hidden states (B, T, C) after the final LN."""
        return self.final_layer_norm(self.blocks(x, pos, cache, kv_index))

    def blocks(self, x, pos, cache=None, kv_index=None):
        """The layer stack alone -> the residual stream (B, T, C); each layer appends its keys and values to a cache."""
        cos, sin = (t[pos].to(x.dtype)[:, None, None] for t in (self.rope_cos, self.rope_sin))  # (T, 1, 1, rot)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, cos, sin, cache, i, kv_index)
            elif recompute:
                x = checkpoint(block, x, cos, sin, kv_index=kv_index, use_reentrant=False)
            else:  # no layer index: a compiled Block would specialize on it
                x = block(x, cos, sin, kv_index=kv_index)
        if cache is not None:
            cache.pos += x.size(1)
        return x

    def embed(self, idx):
        return self.embed_in(idx) * self.config.embed_scale  # (B, T, C)

    def positions(self, n_tokens, caches, device):
        """Position ids (n_tokens,) of tokens after what the caches hold (none: from 0)."""
        start = caches[0].pos // self.config.slots if caches else 0
        return torch.arange(start, start + n_tokens, device=device)

    # --- forward ---
    def forward(self, idx, targets=None, n_jacobi=None, kept=None):
        """idx (B, T) -> logits (B, T, V), and the loss if targets (B, T) are given (-1 = ignore). PonderLM-2:
        n_jacobi (default config.n_jacobi) and kept, see think."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size {self.config.block_size}")
        logits = self.embed_out(self.next_token_states(idx, n_jacobi=n_jacobi, kept=kept))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = self.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def next_token_states(self, idx, caches=None, n_jacobi=None, every_pass=False, kept=None):
        """The hidden states (B, T, C) that predict each next token, by the method. With caches (new_caches), idx
        comes after what they hold, PonderLM-2 token by token. every_pass: (B, T, P, C), see pass_states."""
        cfg = self.config
        if cfg.n_thoughts:
            if caches:
                h, thoughts = self.sequential(idx, caches)
                return torch.cat((thoughts, h[:, :, None]), dim=2) if every_pass else h
            return self.think(idx, cfg.n_jacobi if n_jacobi is None else n_jacobi, every_pass=every_pass, kept=kept)
        if cfg.n_ponder or cfg.n_hidden:
            return self.ponder(idx, caches, every_pass)
        if cfg.n_pause:
            return self.pause(idx, caches[0] if caches else None, every_pass)
        if cfg.n_loop:
            return self.loop(idx, caches, every_pass)
        pos = self.positions(idx.size(1), caches, idx.device)
        h = self.trunk(self.embed(idx), pos, caches[0] if caches else None)
        return h[:, :, None] if every_pass else h

    # --- PonderLM-2 ---
    def think(self, idx, n_jacobi, cache=None, stop=None, every_pass=False, kept=None):
        """PonderLM-2 in parallel (docs/design.md): K thought stages, n_jacobi Jacobi passes over all (K+1)T slots
        (K(T-1): exact), a final pass -> each token's predicting state h (B, T, C); every_pass: all slots' (B, T, K+1,
        C). cache: ends with the last pass's keys and values; stop(r, thoughts (B, T, K, C), h) True: return after
        pass r; kept (B, T): the thoughts each token computes (thought dropout)."""
        K, G, graph = self.config.n_thoughts, self.jacobi_grad_passes, torch.is_grad_enabled()
        e = self.embed(idx)  # (B, T, C)
        stages = [e]
        with torch.set_grad_enabled(graph and not G):
            for _ in range(K):  # S stages in, S outputs out: thought stages 1..S
                h = self.run_stages(stages, kept=kept)  # (B, T, S, C)
                stages = [e] + list(h.unbind(dim=2))
        start = cache.pos if cache is not None else 0
        for r in range(n_jacobi + 1):
            if cache is not None:  # each pass rewrites the same slots
                cache.pos = start
            with torch.set_grad_enabled(graph and (not G or r > n_jacobi - G)):
                h = self.run_stages(stages, cache, kept)  # (B, T, K+1, C)
            # each token's last slot computed predicts
            last = h[:, :, K] if kept is None else h.take_along_dim(kept[..., None, None], dim=2)[:, :, 0]
            stopped = stop is not None and stop(r, torch.stack(stages[1:], dim=2), last)
            if stopped or r == n_jacobi:
                return h if every_pass else last
            stages = [e] + list(h[:, :, :K].unbind(dim=2))  # the Jacobi step: thought j+1 <- output at slot j

    def run_stages(self, stages, cache=None, kept=None):
        """S stages (B, T, C) interleaved token-major, e_1 z_1^1 .. e_2 z_2^1 .., each slot at its token's
        position, through f once -> (B, T, S, C)."""
        (B, T, C), S = stages[0].size(), len(stages)
        x = torch.stack(stages, dim=2).view(B, T * S, C)
        pos = self.positions(T, cache and [cache], x.device).repeat_interleave(S)
        kv_index = None
        if kept is not None and S > 1:  # (B * T * S,): a token's slot s shows the keys and values of slot min(s, kept)
            slot = torch.minimum(torch.arange(S, device=x.device), kept[..., None])  # (B, T, S)
            kv_index = (slot + S * torch.arange(B * T, device=x.device).view(B, T, 1)).flatten()
        return self.trunk(x, pos, cache, kv_index).view(B, T, S, C)

    def exact_passes(self, n_tokens):
        """The Jacobi passes after which every thought of n_tokens tokens is exact: K(T-1)."""
        return self.config.n_thoughts * (n_tokens - 1)

    def sequential(self, idx, caches):
        """idx (B, T) through the caches, as decoding runs it: a token, then K times its last output at its position.
        -> the hidden states that predict each next token (B, T, C), and the thoughts (B, T, K, C) or None."""
        B, T = idx.size()
        K = self.config.n_thoughts
        if not K:  # the other methods' passes are causal over the tokens: the dispatcher's one call is exact
            return self.next_token_states(idx, caches), None
        hs, thoughts, tau = [], [], self.think_threshold
        for t in range(T):
            pos = self.positions(1, caches, idx.device)
            h = self.trunk(self.embed(idx[:, t:t + 1]), pos, caches[0])  # (B, 1, C)
            done = torch.zeros(B, 1, 1, dtype=torch.bool, device=idx.device)
            for _ in range(K):  # each thought is the previous slot's output
                thoughts.append(h)
                if tau < 1:  # adaptive (docs/evaluation.md): a row sure of its next token skips the rest
                    sure = F.softmax(self.embed_out(h).float(), dim=-1).amax(dim=-1, keepdim=True) > tau
                    caches[0].stopped = caches[0].stopped + (sure & ~done).sum()
                    done = done | sure
                if tau < 1 and h.device.type == 'cpu' and bool(done.all()):  # no row thinks: no pass (CPU only)
                    caches[0].pos += 1
                    caches[0].reuse_last(done.view(B))
                    continue
                h_next = self.trunk(h, pos, caches[0])
                if tau < 1:  # a skipped slot keeps the last computed slot's keys and values, and its output
                    caches[0].reuse_last(done.view(B))
                    h_next = torch.where(done, h, h_next)
                h = h_next
            hs.append(h)
        return torch.cat(hs, dim=1), torch.cat(thoughts, dim=1).view(B, T, K, -1)

    @torch.no_grad()
    def sequential_logits(self, idx):
        """Teacher-forced logits (B, T, V) with exact thoughts, as decoding computes them."""
        h, _ = self.sequential(idx, self.new_caches(idx.size(0), idx.size(1), idx.device))
        return self.embed_out(h)

    # --- the other methods ---
    def ponder(self, idx, caches=None, every_pass=False):
        """PonderLM and Hidden: N times, add to the input what the last pass gives -> its hidden states (B, T, C)."""
        cfg = self.config
        N, s = cfg.n_ponder or cfg.n_hidden, cfg.embed_scale
        pos = self.positions(idx.size(1), caches, idx.device)
        c = self.embed(idx) * (N if cfg.ponder_multiply and cfg.n_ponder else 1)  # (B, T, C)
        hs = []
        for step in range(N + 1):
            h = self.trunk(c, pos, caches[step] if caches else None)  # (B, T, C)
            hs.append(h)
            if step == N:
                return torch.stack(hs, dim=2) if every_pass else h
            # Hidden adds the output itself, PonderLM the expected next-token embedding
            c = c + (h if cfg.n_hidden else F.softmax(self.embed_out(h), dim=-1) @ self.embed_in.weight * s)

    def pause(self, idx, cache=None, every_pass=False):
        """Pause: K pause embeddings after each token, at its position, in one pass; the last pause predicts."""
        e = self.embed(idx)  # (B, T, C)
        p = self.embed(torch.full_like(idx, self.config.pause_token_id))  # (B, T, C)
        h = self.run_stages([e] + [p] * self.config.n_pause, cache)  # (B, T, K+1, C)
        return h if every_pass else h[:, :, -1]

    def loop(self, idx, caches=None, every_pass=False):
        """Loop: the layer stack K+1 times with the same weights, the final LayerNorm once; a cache per run."""
        pos = self.positions(idx.size(1), caches, idx.device)
        x = self.embed(idx)  # (B, T, C)
        xs = []
        for j in range(self.config.n_loop + 1):
            x = self.blocks(x, pos, caches[j] if caches else None)
            xs.append(x)
        return self.final_layer_norm(torch.stack(xs, dim=2) if every_pass else x)

    def new_caches(self, batch_size, max_len, device):
        """Empty KV caches for max_len tokens and their slots, in the dtype the layers compute in (autocast's)."""
        cfg, device_type = self.config, torch.device(device).type
        on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if on else self.embed_in.weight.dtype
        return [KVCache(cfg, batch_size, cfg.slots * max_len, device, dtype) for _ in range(cfg.n_caches)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, **prompt):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. See generate_stream."""
        steps = generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, **prompt)
        return torch.cat([idx] + [idx_next for idx_next, _ in steps], dim=1)


# -----------------------------------------------------------------------------
# generation: functions over a model

def prefill(model, idx, max_len, n_jacobi=None, stop=None, exact=False):
    """A prompt (B, T) into new caches for max_len tokens -> (the state that predicts the next token (B, C),
    caches); its thoughts by think (n_jacobi passes, or until stop), or exact."""
    caches = model.new_caches(idx.size(0), max_len, idx.device)
    if model.config.n_thoughts and not exact and model.think_threshold >= 1:  # (adaptive: token by token)
        if n_jacobi is None:
            n_jacobi = model.config.n_jacobi if stop is None else model.exact_passes(idx.size(1))
        h = model.think(idx, n_jacobi, caches[0], stop)
    else:
        h, _ = model.sequential(idx, caches)
    return h[:, -1], caches


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                    n_jacobi=None, stop=None, exact=False):
    """Yield (idx_next (B, 1), the logits it was sampled from (B, V)) per new token. The prompt (B, T) must fit
    in block_size, the new tokens need not (docs/design.md). Thoughts after the prompt's (prefill) are exact.
    use_cache=False recomputes every step."""
    T, L = idx.size(1), model.config.block_size
    if T == 0:
        raise ValueError("generate needs at least one prompt token (e.g. the EOS token)")
    if T > L:
        raise ValueError(f"the prompt ({T} tokens) is longer than block_size {L}: keep its last {L} tokens")
    if not use_cache and model.think_threshold < 1 and model.config.n_thoughts:
        raise ValueError("adaptive thoughts (think_threshold < 1) decode through the KV cache: use_cache=True")
    window = idx  # (B, <= L): the tokens the next logits come from
    if use_cache:
        h, caches = prefill(model, idx, min(T + max_new_tokens, L), n_jacobi, stop, exact)
        head = model.embed_out.weight.detach().t().to(caches[0].k.dtype).contiguous()  # (C, V): see docs/cost.md
    for i in range(max_new_tokens):
        if use_cache:
            logits = h.to(head.dtype) @ head  # (B, V)
        else:  # from scratch, with the passes that make every thought exact: the reference
            logits = model(window, n_jacobi=model.exact_passes(window.size(1)))[0][:, -1]
        idx_next = sample(logits.float(), temperature, top_k, top_p)  # (B, 1)
        yield idx_next, logits
        if i == max_new_tokens - 1:
            return
        window = torch.cat((window, idx_next), dim=1)
        if window.size(1) > L:  # the window slides: its last half, recomputed exactly into new caches
            window = window[:, -max(1, L // 2):]
            if use_cache:
                h, caches = prefill(model, window, min(window.size(1) + max_new_tokens - i, L), exact=True)
        elif use_cache:  # the new token through the caches
            h = model.sequential(idx_next, caches)[0][:, -1]


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> token ids (B, 1). temperature 0 is greedy; top_k and top_p (nucleus) filter first."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    top = logits.amax(dim=-1, keepdim=True)  # the top logit becomes 0, the others below: a tiny temperature is greedy
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


@torch.no_grad()
def pass_states(model, idx, n_jacobi=None):
    """Each token's P readouts (B, T, P, C), the last of which predicts (docs/evaluation.md, the lens); Loop's
    are its runs through the final LayerNorm (the logit lens). Exact thoughts, or n_jacobi Jacobi passes."""
    if model.config.n_thoughts and n_jacobi is None:
        return model.next_token_states(idx, model.new_caches(idx.size(0), idx.size(1), idx.device), every_pass=True)
    return model.next_token_states(idx, n_jacobi=n_jacobi, every_pass=True)


def settled(tol):
    """Adaptive Jacobi: a stop for one GPT.think call, once a pass moved the thoughts z by ||z - z_prev|| / ||z||
    <= tol (0: the exact fixed point)."""
    previous = []

    def stop(r, thoughts, h):
        z = thoughts.float()
        done = bool(previous) and ((z - previous[0]).norm() / z.norm().clamp_min(1e-30)).item() <= tol
        previous[:] = [z]
        return done
    return stop
