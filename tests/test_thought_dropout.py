"""Thought dropout (train.py's thought_dropout, the model's `kept`): in the parallel Jacobi form a token computes
only its first kept[t] thoughts, each skipped slot showing later slots the keys and values of its token's last
computed slot, as adaptive decoding skips them. Against a slot-by-slot reference through a KV cache, against
decoding at τ = 0, and through train.py (the pattern's draw, an exact resume, bad values).

    python -m pytest tests/test_thought_dropout.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from nanoponder.prerun import MAX_SEED
from train import thought_pattern
from helpers import assert_one_error, metrics, randomize_matrices, run_train, tiny


def skipping_reference(model, idx, kept):
    """One row at a time through its own cache: per token its slot, then its first kept[b, t] thoughts (each the
    previous slot's output); each skipped slot gets a copy of the last computed slot's keys and values, by hand.
    -> the states that predict each next token (B, T, C): the last computed slot's output, and the caches' keys
    (n_layer, B, n_head, T (K+1), head_size)."""
    K = model.config.n_thoughts
    out, keys = [], []
    for row, kept_row in zip(idx, kept):
        cache = model.new_caches(1, idx.size(1), idx.device)[0]
        hs = []
        for t, (token, k) in enumerate(zip(row.tolist(), kept_row.tolist())):
            pos = torch.tensor([t])
            h = model.trunk(model.embed(torch.tensor([[token]])), pos, cache)
            for _ in range(k):
                h = model.trunk(h, pos, cache)
            for _ in range(K - k):
                cache.k[:, :, :, cache.pos] = cache.k[:, :, :, cache.pos - 1]
                cache.v[:, :, :, cache.pos] = cache.v[:, :, :, cache.pos - 1]
                cache.pos += 1
            hs.append(h)
        out.append(torch.cat(hs, dim=1))
        keys.append(cache.k[:, 0, :, :cache.pos])
    return torch.cat(out), torch.stack(keys, dim=1)


def multiplicity_attention(kept, S):
    """An attention kernel for Attention.attend that applies a skip pattern kept (B, T) to S slots per token
    without copying keys: a query seeing n copies of a slot's key and value attends to that slot with weight n,
    i.e. log(n) added to its score (-inf: a skipped slot's own key, which it never shows)."""
    def attend(q, k, v, past=0):
        B, N = kept.size(0), q.size(2)
        s = torch.arange(S)
        shown = (torch.minimum(s, kept[..., None]) + S * torch.arange(N // S)[:, None]).view(B, N)  # (B, N)
        copies = torch.ones(N, N).tril() @ F.one_hot(shown, N).float()  # (B, N, N): query i, key j: times seen
        return F.scaled_dot_product_attention(q, k, v, attn_mask=copies.log()[:, None])
    return attend


def think_with_multiplicities(model, idx, R, kept):
    """PonderLM-2's parallel form spelled out (K stages, R Jacobi passes, a final one) with every Attention's
    kernel replaced by multiplicity_attention -> each token's last computed slot's output (B, T, C)."""
    K = model.config.n_thoughts
    layers = [block.attention for block in model.layers]
    kernels = [attention.attend for attention in layers]
    e = model.embed(idx)
    stages = [e]
    try:
        for r in range(K + R + 1):
            for attention in layers:
                attention.attend = multiplicity_attention(kept, len(stages))
            h = model.run_stages(stages)  # no kept: the kernel applies the pattern
            stages = [e] + list(h[:, :, :K].unbind(dim=2))
    finally:
        for attention, kernel in zip(layers, kernels):
            attention.attend = kernel
    return h.take_along_dim(kept[..., None, None], dim=2)[:, :, 0]


@pytest.mark.parametrize('K', [1, 2])
def test_the_parallel_form_under_a_skip_pattern_is_the_sequential_one(K):
    model = randomize_matrices(tiny(n_thoughts=K), std=0.25)
    T = 9
    idx = torch.randint(0, 97, (3, T), generator=torch.Generator().manual_seed(K))
    kept = thought_pattern(1337, 5, K, idx.shape, K, 0.4)
    assert set(kept.unique().tolist()) == set(range(K + 1))  # every stop occurs: 0, 1 (and 2) thoughts
    with torch.no_grad():
        ref, ref_keys = skipping_reference(model, idx, kept)
        h = model.think(idx, model.exact_passes(T), kept=kept)  # the Jacobi fixed point
        torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
        # the skips change what later tokens see: the pattern is not a no-op
        assert (h - model.think(idx, model.exact_passes(T))).abs().amax() > 1e-2
        # no skip is today's forward, to the bit
        assert torch.equal(model.think(idx, 2, kept=torch.full_like(idx, K)), model.think(idx, 2))
        # before the fixed point too (R = 0, 1: what training runs, where the stage passes' map matters): the
        # copied keys equal attention that counts each shown key as often as it is seen
        for R in (0, 1):
            torch.testing.assert_close(model.think(idx, R, kept=kept), think_with_multiplicities(model, idx, R, kept),
                                       atol=1e-5, rtol=1e-5)
        # through a cache (prefill's form), the cache ends holding decoding's keys: the reference's
        cache = model.new_caches(3, T, 'cpu')[0]
        torch.testing.assert_close(model.think(idx, model.exact_passes(T), cache, kept=kept), ref, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(cache.k[:, :, :, :cache.pos], ref_keys, atol=1e-5, rtol=1e-5)
        # the logits and the loss read each token's last computed slot
        targets = torch.randint(0, 97, (3, T))
        logits, loss = model(idx, targets, n_jacobi=model.exact_passes(T), kept=kept)
        torch.testing.assert_close(logits, model.embed_out(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, F.cross_entropy(model.embed_out(ref).view(-1, 97), targets.view(-1)))


def test_every_thought_dropped_is_decoding_at_threshold_zero_and_gradients_flow():
    model = randomize_matrices(tiny(n_thoughts=2), std=0.25)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    model.think_threshold = 0.0  # decoding: every token reads its token slot and copies its keys and values
    with torch.no_grad():
        decoded, _ = model.sequential(idx, model.new_caches(2, 7, 'cpu'))
    model.think_threshold = 1.0
    none = torch.zeros_like(idx)
    torch.testing.assert_close(model.think(idx, 1, kept=none).detach(), decoded, atol=1e-5, rtol=1e-5)
    # a training step through the index map: gradients reach the weights, with and without recomputation
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model.train()
        model(idx, idx, n_jacobi=2, kept=thought_pattern(0, 0, 0, idx.shape, 2, 0.5))[1].backward()
        grads.append(model.layers[0].attention.query_key_value.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
    # with truncated backpropagation (the last pass builds a graph): the same forward value under the pattern
    kept = thought_pattern(0, 0, 0, idx.shape, 2, 0.5)
    losses = []
    for G in (0, 1):
        model.jacobi_grad_passes = G
        losses.append(model(idx, idx, n_jacobi=2, kept=kept)[1])
    model.jacobi_grad_passes = 0
    assert torch.equal(losses[0], losses[1])


def test_the_pattern_is_a_pure_function_with_the_stop_probability_at_each_thought():
    a = thought_pattern(1337, 7, 3, (64, 512), 2, 0.3)
    assert torch.equal(a, thought_pattern(1337, 7, 3, (64, 512), 2, 0.3))
    assert not torch.equal(a, thought_pattern(1337, 7, 4, (64, 512), 2, 0.3))  # another micro-batch
    assert not torch.equal(a, thought_pattern(1337, 8, 3, (64, 512), 2, 0.3))  # another iteration
    # stop at each thought with p: P(0) = p, P(1) = (1 - p) p, P(2) = (1 - p)^2 (n = 32,768: sd < 0.003)
    share = torch.bincount(a.flatten(), minlength=3).float() / a.numel()
    torch.testing.assert_close(share, torch.tensor([0.3, 0.21, 0.49]), atol=0.012, rtol=0)
    assert thought_pattern(1, 1, 0, (4, 4), 1, 0.0).eq(1).all()  # p = 0: every token thinks
    thought_pattern(MAX_SEED, 10 ** 9, 1023, (2, 2), 1, 0.3)  # the largest seed train.py takes: no overflow


def test_train_py_draws_the_pattern_and_resumes_exactly(tmp_path):
    args = ['--max_iters=4', '--eval_interval=2', '--always_save_checkpoint=True', '--thought_dropout=0.5']
    r = run_train(tmp_path, *args, out='full')
    assert 'thought dropout 0.5' in r.stdout
    run_train(tmp_path, *args[1:], '--max_iters=2', out='half')
    run_train(tmp_path, *args, '--init_from=resume', out='half')
    (full, _), (half, _) = metrics(tmp_path / 'full'), metrics(tmp_path / 'half')
    assert full == half  # the same patterns after the resume
    run_train(tmp_path, '--max_iters=1', '--eval_interval=1', out='plain')
    assert metrics(tmp_path / 'plain')[0][0] != full[0]  # the first step's loss: the pattern is applied


def test_bad_thought_dropout_is_one_error_line_and_a_model_without_thoughts_a_note(tmp_path):
    for bad in ('1.0', '-0.1'):
        r = run_train(tmp_path, '--max_iters=2', f'--thought_dropout={bad}', out='bad', check=False)
        assert_one_error(r, 2, 'thought_dropout must be a probability in [0, 1)')
    assert not (tmp_path / 'bad').exists()
    r = run_train(tmp_path, '--max_iters=1', '--eval_interval=1', '--n_thoughts=0', '--thought_dropout=0.3',
                  out='vanilla')
    assert 'note: thought_dropout=0.3: a vanilla model has no thoughts to skip' in r.stdout


def test_the_memory_plan_counts_the_copied_keys_and_values():
    from model import GPTConfig
    from nanoponder.cost import pass_schedule, plan_memory
    config = GPTConfig.preset('pythia-70m', n_thoughts=2)
    plain, dropout = (plan_memory(config, 4, 512, n_jacobi=3, dtype=torch.bfloat16, thought_dropout=p)
                      for p in (0.0, 0.3))
    slots = sum(S * 512 * count for S, count in pass_schedule(config, 3))  # every pass's slots, stages included
    assert dropout.activations - plain.activations == 4 * slots * config.n_layer * 2 * config.n_embd * 2  # bf16
    assert 'thought dropout 0.3' in dropout.description and 'thought dropout' not in plain.description
