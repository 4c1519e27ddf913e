"""
Adaptive thoughts, scored over a text: the loss of decoding with the model's think_threshold
rule (model.GPT.sequential: a token stops thinking once a readout's top probability exceeds τ, a skipped slot
reusing the last computed slot's keys and values), teacher-forced through the KV cache as decoding runs it, one row
per τ: the share of thought slots skipped, the loss, the FLOPs per token (cost.adaptive_flops_per_token), and the
speed of decoding at batch 1 (the first batch's windows one at a time, token by token, timed) with the share of
its skip decisions that differ from the batched evaluation's on the same tokens (rounding near τ can flip one).

    rows = score_thresholds(model, lambda: window_batches(...), (1.0, 0.9, 0.6, 0.0))
    print(adaptive_table(rows))
"""
import math
import time

import torch

from nanoponder.batches import nats
from nanoponder.cost import adaptive_flops_per_token, inference_flops_per_token


@torch.no_grad()
def score_thresholds(model, batches, thresholds):
    """batches(): a fresh iterator of (x, y) windows (y: -1 = context, not scored). -> a row per threshold."""
    cfg, rows, before = model.config, [], model.think_threshold
    try:
        for tau in thresholds:
            model.think_threshold = float(tau)
            total = n = tokens = skipped = stopped = 0
            for x, y in batches():
                caches = model.new_caches(x.size(0), x.size(1), x.device)
                h, _ = model.sequential(x, caches)
                total += nats(model.embed_out(h), y)
                n += int((y >= 0).sum())
                if not tokens:  # the first batch: its decisions, for the flip rate
                    first, batched = x, skip_decisions(caches[0], x.size(1), cfg.slots)
                tokens += x.numel()
                skipped, stopped = skipped + int(caches[0].skipped), stopped + int(caches[0].stopped)
            loss = total / n
            speed, flips = decode_at_batch_one(model, first, batched)
            rows.append(dict(threshold=float(tau), loss=loss, ppl=math.exp(min(loss, 700)),
                             skipped=skipped / (cfg.n_thoughts * tokens),
                             stopped=stopped / tokens,
                             flops_per_token=adaptive_flops_per_token(cfg, skipped / tokens, stopped / tokens)
                             if tau < 1 else inference_flops_per_token(cfg),  # (1: no check is made)
                             tokens_per_second=speed, flip_rate=flips, flip_decisions=batched.numel()))
    finally:
        model.think_threshold = before
    return rows


def skip_decisions(cache, n_tokens, slots):
    """(B, n_tokens, slots - 1) bool: whether thought slot j + 1 of each of the first n_tokens tokens was skipped,
    read from the cache: a skipped slot's keys are a bit-exact copy of the slot before it, in every layer and head."""
    L, B, H, _, D = cache.k.shape
    k = cache.k[:, :, :, :slots * n_tokens].reshape(L, B, H, n_tokens, slots, D)
    return (k[..., 1:, :] == k[..., :-1, :]).all(dim=-1).all(dim=2).all(dim=0)


def timed_decoding(model, x):
    """x (B, n) decoded token by token through a new KV cache, as generation decodes (the logits of each step
    included) -> (seconds, the cache). The caller warms up first: first calls allocate."""
    caches = model.new_caches(x.size(0), x.size(1), x.device)
    sync = torch.cuda.synchronize if x.device.type == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    for t in range(x.size(1)):
        h, _ = model.sequential(x[:, t:t + 1], caches)
        model.embed_out(h)  # the logits a decoder samples from
    sync()
    return time.perf_counter() - start, caches[0]


def decode_at_batch_one(model, x, batched):
    """Each row of x (B, n) decoded alone (timed_decoding), after a warm-up -> (tokens per second, the share of the
    skip decisions that differ from batched (B, n, K), the batched run's)."""
    model.sequential(x[:1, :8], model.new_caches(1, 8, x.device))  # warm-up (first calls allocate)
    seconds, flips = 0.0, 0
    for row, decided in zip(x, batched):
        took, cache = timed_decoding(model, row[None])
        seconds += took
        flips += int((skip_decisions(cache, x.size(1), model.config.slots)[0] != decided).sum())
    return x.numel() / seconds, flips / batched.numel()


def adaptive_table(rows):
    lines = ['| think_threshold | thought slots skipped | loss | ppl | FLOPs / token | tokens/s (batch 1) | flips |',
             '|---|---|---|---|---|---|---|']
    lines += [f"| {r['threshold']:g} | {r['skipped']:.1%} | {r['loss']:.4f} | {r['ppl']:.2f} | "
              f"{r['flops_per_token'] / 1e6:.2f}M | {r['tokens_per_second']:.0f} | "
              f"{r['flip_rate']:.2%} of {r['flip_decisions']:,} |" for r in rows]
    return '\n'.join(lines)
