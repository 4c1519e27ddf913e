"""
The lens: every pass of every method read through the LM head, per token (docs/evaluation.md, "The lens").
model.pass_states gives each token's P readouts (B, T, P, C), the last of which predicts; here they become
statistics over a text, a picture of one stretch, and one line per sampled token. The early readouts get no
loss in training: they are an untrained logit lens.

    totals = LensTotals(model.config, *target_buckets(V, ckpt, ids)[:2])
    totals.add(model.embed_out, pass_states(model, x), y)   # per batch; y (B, T) the targets, -1 = not scored
    report = totals.report('exact thoughts', 'ranked by ...'); print(lens_table(report))
"""
import hashlib
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from nanoponder.data import read_meta, read_tokens
from nanoponder.runtime import UserError, atomic_write, cache_path, write_result
from nanoponder.tokenizer import checkpoint_data_dir, tokenizer_mismatch

CHUNK = 1 << 24  # logits held at once: tokens x vocabulary
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXAMPLE = 40  # tokens in the picture


def pass_names(config):
    """A name per readout, first to last (the last predicts)."""
    if config.n_thoughts:
        return ['token'] + [f'thought {j}' for j in range(1, config.n_thoughts + 1)]
    if config.n_pause:
        return ['token'] + [f'pause {j}' for j in range(1, config.n_pause + 1)]
    if config.n_ponder or config.n_hidden:
        return [f'step {j}' for j in range(config.passes)]
    if config.n_loop:
        return [f'run {j}' for j in range(1, config.passes + 1)]
    return ['token']


@torch.no_grad()
def readouts(head, states, y):
    """states (N, P, C) through head, y (N,) the targets -> per token and pass (N, P): the NLL of the target,
    the top-1 id, its probability, and KL(final || pass), computed a chunk of tokens at a time."""
    N, P, _ = states.size()
    out = [torch.empty(N, P, dtype=dt) for dt in (torch.float32, torch.long, torch.float32, torch.float32)]
    n = max(1, CHUNK // head.weight.size(0))
    for i in range(0, N, n):
        s, t = states[i:i + n], y[i:i + n, None]
        final = F.log_softmax(head(s[:, -1]).float(), dim=-1)  # (n, V)
        for p in range(P):
            logp = final if p == P - 1 else F.log_softmax(head(s[:, p]).float(), dim=-1)  # (n, V)
            top_logp, top = logp.max(dim=-1)
            kl = (final.exp() * (final - logp)).sum(dim=-1)
            for o, v in zip(out, (-logp.gather(1, t)[:, 0], top, top_logp.exp(), kl)):
                o[i:i + n, p] = v.cpu()
    return out


def frequency_buckets(counts):
    """Token counts (V,) -> a bucket per id (V,) by its rank in the counts, decades (ranks 1-10, 11-100, ...),
    ids never seen last, and the buckets' labels."""
    order = np.argsort(-counts, kind='stable')
    rank = np.empty(len(counts), dtype=np.int64)
    rank[order] = np.arange(1, len(counts) + 1)
    bucket = np.floor(np.log10(np.maximum(rank - 1, 1))).astype(np.int64)  # ranks 1-10 -> 0, 11-100 -> 1, ...
    unseen = counts == 0
    seen = max(1, int((~unseen).sum()))
    bucket[~unseen] = np.minimum(bucket[~unseen], int(np.floor(np.log10(max(seen - 1, 1)))))
    labels = [f"ranks {10 ** b + 1 if b else 1:,}-{min(10 ** (b + 1), seen):,}"
              for b in range(int(bucket[~unseen].max(initial=0)) + 1)]
    if unseen.any():
        bucket[unseen] = len(labels)
        labels.append('never seen')
    return bucket, labels


def token_counts(ids, vocab_size, step=1 << 26):
    """How often each id occurs in ids (a token file may not fit in memory: read in steps) -> (vocab_size,). A
    token file's counts are kept in $XDG_CACHE_HOME/nanoponder/token_counts (MiniPile's take a minute to count)."""
    path = getattr(ids, 'filename', None)  # a np.memmap of a token file
    cache = None
    if path:
        st = os.stat(path)
        key = hashlib.sha1(f"{os.path.realpath(path)} {st.st_size} {st.st_mtime_ns} {vocab_size}".encode())
        cache = cache_path('token_counts', key.hexdigest() + '.npy')
        try:
            return np.load(cache)
        except (OSError, ValueError):
            pass
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(ids), step):
        counts += np.bincount(np.asarray(ids[i:i + step], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    if cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with atomic_write(cache) as f:
                np.save(f, counts)
        except OSError:  # a cache that cannot be written is skipped
            pass
    return counts


def target_buckets(V, ckpt, ids):
    """The target-frequency buckets of V ids: from the token counts of the training data of a checkpoint (ckpt)
    where it is here, else of the scored text ids -> (bucket per id, labels, which)."""
    try:
        directory = checkpoint_data_dir(ckpt) if ckpt is not None else None
        if directory and os.path.exists(os.path.join(directory, 'train.bin')):
            meta = read_meta(directory)
            if not tokenizer_mismatch(ckpt, directory, meta):
                counts = token_counts(read_tokens(directory, 'train', meta), V)
                return (*frequency_buckets(counts), f"ranked by their counts in {directory}/train.bin")
    except UserError as e:
        print(f"note: the lens ranks tokens by the scored text: the training data cannot be read ({e})",
              file=sys.stderr)
    return (*frequency_buckets(token_counts(ids, V)), "ranked by their counts in the scored text")


class LensTotals:
    """Sums over the batches: per pass the NLL, top-1 hits and KL(final || pass); fixed and broken between the
    first pass and the last; each token's NLL gain and bucket; the first window's readouts for the picture."""

    def __init__(self, config, bucket_of, labels):
        self.names = pass_names(config)
        P = len(self.names)
        self.bucket_of, self.labels = bucket_of, labels
        self.nll, self.hits, self.kl = np.zeros(P), np.zeros(P, dtype=np.int64), np.zeros(P)
        self.n = self.first_right = self.fixed = self.broken = 0
        self.gains, self.buckets, self.example = [], [], None

    def add(self, head, states, y):
        """states (B, T, P, C) of one batch, y (B, T) its targets (-1: context, not scored)."""
        scored = y >= 0
        nll, top, prob, kl = readouts(head, states[scored], y[scored])  # each (N, P)
        target = y[scored].cpu()
        right = top == target[:, None]
        self.n += len(target)
        self.nll += nll.double().sum(0).numpy()
        self.hits += right.sum(0).numpy()
        self.kl += kl.double().sum(0).numpy()
        self.first_right += int(right[:, 0].sum())
        self.fixed += int((~right[:, 0] & right[:, -1]).sum())
        self.broken += int((right[:, 0] & ~right[:, -1]).sum())
        self.gains.append((nll[:, 0] - nll[:, -1]).numpy())
        self.buckets.append(self.bucket_of[target.numpy()])
        if self.example is None:  # the first window's scored tokens
            first = int(scored[0].sum())
            self.example = dict(targets=target[:first].tolist(), p_true=(-nll[:first]).exp().tolist(),
                                top=top[:first].tolist())

    def report(self, thoughts, frequency_source):
        n, P = self.n, len(self.names)
        gains, buckets = np.concatenate(self.gains), np.concatenate(self.buckets)
        errors = n - self.first_right
        rows = [dict(bucket=label, tokens=int((buckets == b).sum()),
                     mean_gain=float(gains[buckets == b].mean()),
                     gain_quantiles=quantiles(gains[buckets == b])) for b, label in enumerate(self.labels)
                if (buckets == b).any()]
        return dict(thoughts=thoughts, tokens=n, passes=[dict(name=self.names[p], nll=self.nll[p] / n,
                                                              top1=self.hits[p] / n, kl_from_final=self.kl[p] / n)
                                                         for p in range(P)],
                    fixed=dict(tokens=self.fixed, share=self.fixed / n, of_first_errors=self.fixed / max(errors, 1)),
                    broken=dict(tokens=self.broken, share=self.broken / n,
                                of_first_correct=self.broken / max(self.first_right, 1)),
                    gain_quantiles=quantiles(gains), frequency_source=frequency_source, by_frequency=rows,
                    example=self.stretch())

    def stretch(self):
        """The EXAMPLE tokens of the first window where the passes change p(true) most (|last - first|, summed):
        the targets, and per pass p(true) and the top-1 id."""
        ex = self.example
        p_true = np.array(ex['p_true']).T  # (P, T)
        change = np.abs(p_true[-1] - p_true[0])
        start = int(np.convolve(change, np.ones(EXAMPLE), mode='valid').argmax()) if len(change) > EXAMPLE else 0
        window = slice(start, start + EXAMPLE)
        return dict(start=start, targets=ex['targets'][window], p_true=p_true[:, window].tolist(),
                    top=np.array(ex['top']).T[:, window].tolist())


def quantiles(values):
    return {f'{q:.0%}': float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def lens_table(report):
    """The report as text: a row per pass, fixed and broken, the NLL gain (first pass - last) by frequency."""
    lines = [f"lens ({report['thoughts']}): {report['tokens']:,} tokens, the last pass predicts",
             '| pass | NLL | top-1 | KL(final, pass) |', '|---|---|---|---|']
    lines += [f"| {p['name']} | {p['nll']:.4f} | {p['top1']:.2%} | {p['kl_from_final']:.4f} |"
              for p in report['passes']]
    fixed, broken = report['fixed'], report['broken']
    if len(report['passes']) > 1:
        lines.append(f"fixed (wrong top-1 at the first pass, right at the last): {fixed['share']:.2%} of tokens, "
                     f"{fixed['of_first_errors']:.2%} of the first pass's errors; broken (right, then wrong): "
                     f"{broken['share']:.2%} of tokens, {broken['of_first_correct']:.2%} of its correct ones")
    lines += [f"NLL gain (first pass - last) by the target's frequency ({report['frequency_source']}):",
              '| target | tokens | mean | ' + ' | '.join(QUANTILE_NAMES) + ' |', '|---' * (3 + len(QUANTILES)) + '|']
    for r in report['by_frequency'] + [dict(bucket='all', tokens=report['tokens'], mean_gain=None,
                                            gain_quantiles=report['gain_quantiles'])]:
        mean = '-' if r['mean_gain'] is None else f"{r['mean_gain']:.4f}"
        lines.append(f"| {r['bucket']} | {r['tokens']:,} | {mean} | " +
                     ' | '.join(f"{v:.4f}" for v in r['gain_quantiles'].values()) + ' |')
    return '\n'.join(lines)


QUANTILE_NAMES = [f'{q:.0%}' for q in QUANTILES]


def plot_lens(report, decode, path, title):
    """A heatmap of the first window's most changed stretch (tokens along x, passes along y, coloured by the
    probability of the true next token, the first pass's top-1 written where it differs from the last's), and the
    NLL per pass over the whole text."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no lens picture (pip install matplotlib)", file=sys.stderr)
        return None
    ex, names = report['example'], [p['name'] for p in report['passes']]
    p_true, top, targets = np.array(ex['p_true']), np.array(ex['top']), ex['targets']  # (P, tokens), (P, tokens)
    fig, (heat, curve) = plt.subplots(1, 2, figsize=(0.3 * len(targets) + 5, 2.4 + 0.55 * len(names)),
                                      gridspec_kw=dict(width_ratios=[0.3 * len(targets), 2.5]))
    image = heat.imshow(p_true, aspect='auto', cmap='viridis', vmin=0, vmax=1, interpolation='nearest')
    fig.colorbar(image, ax=heat, label='p(true next token)', fraction=0.03)
    heat.set_yticks(range(len(names)), names)
    heat.set_xticks(range(len(targets)), [token_label(decode, t) for t in targets], rotation=90, fontsize=8)
    heat.set_xlabel('the true next token')
    for i in range(p_true.shape[1]):
        if top[0, i] != top[-1, i]:  # the first pass guessed otherwise: its guess in the cell
            heat.text(i, 0, token_label(decode, top[0, i]), ha='center', va='center', fontsize=7, rotation=90,
                      color='white' if p_true[0, i] < 0.5 else 'black')
    heat.set_title(f"{title} ({report['thoughts']})\n{len(targets)} tokens of the first window where the passes "
                   f"change p(true) most; in the first row, its top-1 where it differs from the last pass's",
                   fontsize=9)
    curve.plot(range(len(names)), [p['nll'] for p in report['passes']], 'o-')
    curve.set_xticks(range(len(names)), names, rotation=90)
    curve.set_xlim(-0.5, len(names) - 0.5)
    curve.set_ylabel('mean NLL (nats/token)')
    curve.set_title(f"over all {report['tokens']:,} tokens", fontsize=9)
    fig.tight_layout()
    with write_result(path) as f:
        fig.savefig(f, format='png', dpi=100)
    plt.close(fig)
    return path


def token_label(decode, token_id):
    text = decode([int(token_id)])
    return repr(text)[1:-1].replace(' ', '\u2423')[:12] or '?'


@torch.no_grad()
def sample_lines(model, ids, n_prompt, decode):
    """One line per sampled token of ids (the prompt's n_prompt ids, then the sample) that fits in the context:
    each pass's top-1 with its probability, then the token chosen. The sample is read again, teacher-forced, with
    exact thoughts (decoding's after the prompt)."""
    from model import pass_states
    names = pass_names(model.config)
    L = model.config.block_size
    x = torch.tensor([ids[:L]], device=model.embed_in.weight.device)
    states = pass_states(model, x)[0, n_prompt - 1:]  # (new tokens, P, C): each predicts the next id
    chosen = torch.tensor(ids[n_prompt:L], device=x.device)
    _, top, prob, _ = readouts(model.embed_out, states[:len(chosen)].float(), chosen)
    width = 18
    lines = ['lens: ' + ' | '.join(f'{n:<{width}}' for n in names) + ' | chosen']
    for i, c in enumerate(chosen.tolist()):
        cells = [f"{token_label(decode, top[i, p]):<12} {prob[i, p]:.2f}".ljust(width) for p in range(len(names))]
        lines.append(f'{i + 1:>4}  ' + ' | '.join(cells) + f' | {token_label(decode, c)}')
    if len(ids) > L:
        lines.append(f"(the {len(ids) - L} tokens after the first {L} are not shown: the window slid there)")
    return lines
