"""Thought dropout (train.py's thought_dropout, the model's `kept`): in the parallel Jacobi form a token computes
only its first kept[t] thoughts, each skipped slot showing later slots the keys and values of its token's last
computed slot, as adaptive decoding skips them. Against a slot-by-slot reference through a KV cache, against
decoding at τ = 0, and through train.py (the pattern's draw, an exact resume, bad values).

    python -m pytest tests/test_thought_dropout.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from train import thought_pattern
from helpers import assert_one_error, metrics, randomize_matrices, run_train, tiny


def skipping_reference(model, idx, kept):
    """One row at a time through its own cache: per token its slot, then its first kept[b, t] thoughts (each the
    previous slot's output); each skipped slot gets a copy of the last computed slot's keys and values, by hand.
    -> the states that predict each next token (B, T, C): the last computed slot's output."""
    K = model.config.n_thoughts
    out = []
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
    return torch.cat(out)


@pytest.mark.parametrize('K', [1, 2])
def test_the_parallel_form_under_a_skip_pattern_is_the_sequential_one(K):
    model = randomize_matrices(tiny(n_thoughts=K), std=0.25)
    T = 9
    idx = torch.randint(0, 97, (3, T), generator=torch.Generator().manual_seed(K))
    kept = thought_pattern(1337, 5, K, idx.shape, K, 0.4)
    assert set(kept.unique().tolist()) == set(range(K + 1))  # every stop occurs: 0, 1 (and 2) thoughts
    with torch.no_grad():
        ref = skipping_reference(model, idx, kept)
        h = model.think(idx, model.exact_passes(T), kept=kept)  # the Jacobi fixed point
        torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
        # the skips change what later tokens see: the pattern is not a no-op
        assert (h - model.think(idx, model.exact_passes(T))).abs().amax() > 1e-2
        # no skip is today's forward, to the bit
        assert torch.equal(model.think(idx, 2, kept=torch.full_like(idx, K)), model.think(idx, 2))
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


def test_the_pattern_is_a_pure_function_with_the_stop_probability_at_each_thought():
    a = thought_pattern(1337, 7, 3, (64, 512), 2, 0.3)
    assert torch.equal(a, thought_pattern(1337, 7, 3, (64, 512), 2, 0.3))
    assert not torch.equal(a, thought_pattern(1337, 7, 4, (64, 512), 2, 0.3))  # another micro-batch
    assert not torch.equal(a, thought_pattern(1337, 8, 3, (64, 512), 2, 0.3))  # another iteration
    # stop at each thought with p: P(0) = p, P(1) = (1 - p) p, P(2) = (1 - p)^2 (n = 32,768: sd < 0.003)
    share = torch.bincount(a.flatten(), minlength=3).float() / a.numel()
    torch.testing.assert_close(share, torch.tensor([0.3, 0.21, 0.49]), atol=0.012, rtol=0)
    assert thought_pattern(1, 1, 0, (4, 4), 1, 0.0).eq(1).all()  # p = 0: every token thinks


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
