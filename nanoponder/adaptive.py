"""
Adaptive thoughts, scored over a text: the loss of decoding with the model's think_threshold
rule (model.GPT.sequential: a token stops thinking once a readout's top probability exceeds τ, a skipped slot
reusing the last computed slot's keys and values), teacher-forced through the KV cache as decoding runs it, one row
per τ: the share of thought slots skipped, the loss, the FLOPs per token (cost.adaptive_flops_per_token).

    rows = score_thresholds(model, lambda: window_batches(...), (1.0, 0.9, 0.6, 0.0))
    print(adaptive_table(rows))
"""
import math

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
                tokens += x.numel()
                skipped, stopped = skipped + int(caches[0].skipped), stopped + int(caches[0].stopped)
            loss = total / n
            rows.append(dict(threshold=float(tau), loss=loss, ppl=math.exp(min(loss, 700)),
                             skipped=skipped / (cfg.n_thoughts * tokens),
                             flops_per_token=adaptive_flops_per_token(cfg, skipped / tokens, stopped / tokens)
                             if tau < 1 else inference_flops_per_token(cfg)))  # (1: no check is made)
    finally:
        model.think_threshold = before
    return rows


def adaptive_table(rows):
    lines = ['| think_threshold | thought slots skipped | loss | ppl | FLOPs / token |', '|---|---|---|---|---|']
    lines += [f"| {r['threshold']:g} | {r['skipped']:.1%} | {r['loss']:.4f} | {r['ppl']:.2f} | "
              f"{r['flops_per_token'] / 1e6:.2f}M |" for r in rows]
    return '\n'.join(lines)
