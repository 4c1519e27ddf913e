"""Adaptive thoughts at decode time (the model's think_threshold τ): a token stops thinking once a readout's top
probability exceeds τ, each skipped thought slot taking the keys and values of the last slot computed. Against a
hand-built reference that decodes one row at a time with explicit branches.

    python -m pytest tests/test_adaptive.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from model import KVCache, generate_stream, pass_states
from nanoponder.adaptive import decode_at_batch_one, skip_decisions
from helpers import randomize_matrices, tiny


def model_of(K, tau=1.0):
    model = randomize_matrices(tiny(n_thoughts=K), std=0.25)
    model.think_threshold = tau
    return model


def branching_reference(model, idx, tau):
    """One row at a time through its own cache: per token the token slot, then each thought unless a readout so far
    was surer than tau; a skipped slot gets a copy of the last computed slot's keys and values (by hand). -> the
    predicting states (B, T, C), the caches' keys (B rows), and how many slots were skipped."""
    K = model.config.n_thoughts
    hs, keys, skipped, stopped = [], [], 0, 0
    for row in idx:
        cache = model.new_caches(1, idx.size(1), idx.device)[0]
        out = []
        for t, token in enumerate(row.tolist()):
            pos = torch.tensor([t])
            h = model.trunk(model.embed(torch.tensor([[token]])), pos, cache)
            for _ in range(K):
                if F.softmax(model.embed_out(h).float(), dim=-1).max() > tau:  # sure: the rest are copies
                    break
                h = model.trunk(h, pos, cache)
            computed = cache.pos - t * (K + 1)  # this token's slots computed so far
            stopped += computed < K + 1
            for _ in range(K + 1 - computed):  # the skipped slots: the last computed one's keys and values
                cache.k[:, :, :, cache.pos] = cache.k[:, :, :, cache.pos - 1]
                cache.v[:, :, :, cache.pos] = cache.v[:, :, :, cache.pos - 1]
                cache.pos += 1
                skipped += 1
            out.append(h)
        hs.append(torch.cat(out, dim=1))
        keys.append(torch.cat((cache.k[:, 0, :, :cache.pos], cache.v[:, 0, :, :cache.pos]), dim=-1))
    return torch.cat(hs), torch.stack(keys, dim=1), skipped, stopped


def exact_states(model, idx):
    tau, model.think_threshold = model.think_threshold, 1.0
    states = pass_states(model, idx)[:, :, -1]
    model.think_threshold = tau
    return states


def run(model, idx):
    caches = model.new_caches(idx.size(0), idx.size(1), idx.device)
    h, _ = model.sequential(idx, caches)
    return h, caches[0]


@pytest.mark.parametrize('K', [1, 2])
def test_the_rule_is_the_branching_reference_at_every_threshold(K):
    idx = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(K))
    model = model_of(K)
    with torch.no_grad():
        # thresholds between the readouts' top probabilities, so that rows and tokens decide differently
        top = F.softmax(model.embed_out(pass_states(model, idx)[:, :, :K]).float(), dim=-1).amax(-1)  # (B, T, K)
        taus = [0.0, *torch.quantile(top.flatten(), torch.tensor([0.3, 0.7])).tolist(), 1.0]
        skips = []
        for tau in taus:
            model.think_threshold = tau
            h, cache = run(model, idx)
            ref_h, ref_kv, ref_skipped, ref_stopped = branching_reference(model, idx, tau)
            torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
            kv = torch.cat((cache.k[:, :, :, :cache.pos], cache.v[:, :, :, :cache.pos]), dim=-1)
            torch.testing.assert_close(kv, ref_kv, atol=1e-5, rtol=1e-5)
            assert (int(cache.skipped), int(cache.stopped)) == (ref_skipped, ref_stopped)
            decisions = skip_decisions(cache, idx.size(1), K + 1)  # (B, T, K): read back from the keys
            assert decisions.shape == (3, 10, K) and int(decisions.sum()) == ref_skipped
            assert not (decisions[:, :, :-1] & ~decisions[:, :, 1:]).any()  # a token that stops skips the rest
            # batch 1, each row alone, decides as the batched run here; a decision changed by hand is one flip
            _, flips = decode_at_batch_one(model, idx, decisions)
            assert flips == 0
            changed = decisions.clone()
            changed[1, 4, 0] = ~changed[1, 4, 0]
            assert decode_at_batch_one(model, idx, changed)[1] == pytest.approx(1 / decisions.numel())
            skips.append((ref_skipped, ref_stopped))
    total = K * idx.numel()
    assert skips[0][0] == total and skips[-1][0] == 0 and total > skips[1][0] > skips[2][0] > 0, skips  # it can tell
    if K == 2:  # some token stops after its first thought (skips one slot, not two)
        assert any(2 * stopped - skipped > 0 for skipped, stopped in skips[1:3]), skips


def test_threshold_one_is_todays_decoding_and_zero_reads_the_token_slot():
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = model_of(1)
    with torch.no_grad():
        # tau = 1 is today's decoding: the parallel forward with every thought exact, an independent computation
        exact = model(idx, n_jacobi=model.exact_passes(idx.size(1)))[0]
        torch.testing.assert_close(model.sequential_logits(idx), exact, atol=1e-5, rtol=1e-5)
        first = pass_states(model, idx)[:, :1, 0]  # the thinking model's token-slot readout of the first token
        model.think_threshold = 0.0  # every token predicts from its token slot
        h, cache = run(model, idx)
        torch.testing.assert_close(h[:, :1], first, atol=1e-5, rtol=1e-5)  # (later tokens see copied keys)
        assert (h[:, 1:] - exact_states(model, idx)[:, 1:]).abs().max() > 1e-3  # which differ: the test can tell
        assert int(cache.skipped) == int(cache.stopped) == idx.numel()
        with pytest.raises(ValueError, match='use_cache=True'):
            next(generate_stream(model, idx[:, :4], 2, use_cache=False))
        # a slot past the cache's end is an overflow, also a thought slot that the CPU skips (5 slots: the third
        # token's slot fits, its thought does not)
        for tau in (1.0, 0.0):
            model.think_threshold = tau
            with pytest.raises(RuntimeError, match='KV cache overflow: 6 > 5 slots'):
                model.sequential(idx[:, :3], [KVCache(model.config, 2, 5, 'cpu', torch.float32)])


def test_eval_scores_each_threshold_and_sample_takes_one(tmp_path, tiny_tokenizer):
    """eval.py --think_thresholds: a row per τ (1: the exact loss, nothing skipped; 0: every thought skipped, the
    FLOPs of one slot and a check); sample.py --think_threshold=1 prints today's sample, and a τ outside [0, 1] is
    one error line."""
    import json
    import subprocess
    import sys
    from prepare_data import prepare
    from helpers import ENV, ROOT, assert_one_error, write_checkpoint
    from nanoponder.cost import adaptive_flops_per_token, inference_flops_per_token
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran']
    (tmp_path / 'corpus.txt').write_text((' '.join(words * 2) + '\n') * 40, encoding='utf-8')
    prepare('text', input=str(tmp_path / 'corpus.txt'), tokenizer=tiny_tokenizer(words), out_dir=str(tmp_path / 'data'),
            num_proc=1)
    model = randomize_matrices(tiny('vanilla', vocab_size=300, block_size=16, n_thoughts=1), std=0.2)
    write_checkpoint(tmp_path / 'ckpt.pt', model, tmp_path / 'data')

    def run(script, *args):
        return subprocess.run([sys.executable, script, f'--init_from={tmp_path / "ckpt.pt"}', *args], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=300)
    r = run('eval.py', '--max_windows=2', '--max_jacobi=0', '--jacobi_tols=()', '--think_thresholds=(1,0.5,0)')
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / 'eval.json').read_text())
    exact = {row['name']: row['loss'] for row in report['rows']}['exact']
    one, half, zero = report['adaptive']
    assert one['loss'] == pytest.approx(exact, rel=1e-6) and one['skipped'] == 0
    assert one['flops_per_token'] == inference_flops_per_token(model.config)
    assert zero['skipped'] == 1 and zero['flops_per_token'] == adaptive_flops_per_token(model.config, 1, 1)
    head = 2 * 32 * 300  # tau = 0: one slot's trunk (half of the two slots'), the check and the prediction
    assert zero['flops_per_token'] == pytest.approx((one['flops_per_token'] - head) / 2 + 2 * head, rel=0.02)
    assert 0 <= half['skipped'] <= 1 and zero['loss'] != one['loss']
    assert '| think_threshold | thought slots skipped |' in r.stdout and '| tokens/s (batch 1) | flips |' in r.stdout
    for row in (one, half, zero):  # batch 1 over the first window's tokens: its decisions against the batched ones
        assert row['tokens_per_second'] > 0 and 0 <= row['flip_rate'] <= 1 and row['flip_decisions'] == 2 * 16
    args = ['--max_new_tokens=5', '--start=the cat', '--temperature=0', '--dtype=float32']
    plain, at_one = run('sample.py', *args), run('sample.py', *args, '--think_threshold=1.0')
    assert plain.returncode == at_one.returncode == 0 and plain.stdout == at_one.stdout
    assert run('sample.py', *args, '--think_threshold=0').returncode == 0
    assert_one_error(run('sample.py', *args, '--think_threshold=1.5'), 2, 'think_threshold=1.5 is out of range')
