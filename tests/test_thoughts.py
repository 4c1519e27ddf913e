"""PonderLM-2's thought loop against slow references, the file to read beside model.py. The definition, one slot at a
time (sequential_thought_logits here, GPT.sequential in model.py), is what the parallel Jacobi form (GPT.think)
computes after K(T-1) passes; the exact thoughts are a fixed point of one more pass; a stop (model.settled) ends the
passes early; decoding through the caches (model.prefill, generate_stream) is exact; and on a trained model every
pass brings the thoughts closer to the exact ones. It reads from the top: the definition, then the passes, then
decoding, then training.

    python -m pytest tests/test_thoughts.py -q
"""
import math

import pytest
import torch

from model import GPT, GPTConfig, generate_stream, settled
from helpers import randomize, tiny
from test_eval import thought_rows

BLOCK = 64  # the context of the tiny models here, tiny(block_size=BLOCK)


# -----------------------------------------------------------------------------
# the definition: the parallel Jacobi form against the sequential one

def sequential_thought_slots(model, idx):
    """The definition, one slot at a time: feed e_t, then K times feed back the last output, all at position t.
    No cache, no Jacobi: the whole slot sequence so far is recomputed for every slot. Returns every slot's output
    (B, T, K+1, C): the token slot's (the first thought), ..., the last thought slot's, which predicts."""
    K = model.config.n_thoughts
    slots, positions, outputs = [], [], []
    for t in range(idx.size(1)):
        slots.append(model.embed_in(idx[:, t]) * math.sqrt(2.5 * model.config.n_embd))
        positions.append(t)
        for j in range(K + 1):
            h = model.trunk(torch.stack(slots, dim=1), torch.tensor(positions))[:, -1]  # (B, C)
            outputs.append(h)
            if j < K:  # fed back as the next thought, at the same position
                slots.append(h)
                positions.append(t)
    return torch.stack(outputs, dim=1).view(idx.size(0), idx.size(1), K + 1, -1)


def sequential_thought_logits(model, idx):
    """The definition's logits (B, T, V): each token's last slot's output through the head."""
    return model.embed_out(sequential_thought_slots(model, idx)[:, :, -1])


@pytest.mark.parametrize('K', [1, 2])
def test_parallel_thoughts_equal_sequential_reference(K):
    model = tiny(block_size=BLOCK, n_thoughts=K)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(K))
    with torch.no_grad():
        ref = sequential_thought_logits(model, idx)
        exact, _ = model(idx, n_jacobi=K * (idx.size(1) - 1))  # enough passes to be exact by construction
        at_T, _ = model(idx, n_jacobi=idx.size(1))
        few, _ = model(idx, n_jacobi=1)
    torch.testing.assert_close(exact, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at_T, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.sequential_logits(idx), ref, atol=1e-5, rtol=1e-5)
    assert (few - ref).abs().max() > 1e-3  # too few Jacobi passes are not exact: the test can tell


@pytest.mark.parametrize('K', [1, 2])
def test_exact_thoughts_are_the_sequential_computation_and_a_jacobi_fixed_point(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(K))
    with torch.no_grad():
        h, z = model.sequential(idx, model.new_caches(2, 8, 'cpu'))  # (B, T, C), (B, T, K, C)
        torch.testing.assert_close(model.embed_out(h), model.sequential_logits(idx), atol=1e-5, rtol=1e-5)
        # one more pass over the exact thoughts gives them back: thought j+1 is the output at slot j
        out = model.run_stages([model.embed(idx)] + list(z.unbind(dim=2)))  # (B, T, K+1, C)
        torch.testing.assert_close(out[:, :, :K], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :, K], h, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the passes: what each computes, and a stop that ends them (adaptive Jacobi)

def test_stop_sees_what_each_number_of_fixed_passes_computes():
    model = randomize(tiny(n_thoughts=2), std=0.5)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}
    with torch.no_grad():
        last = model.think(idx, 5, stop=lambda r, z, h: seen.setdefault(r, (z, h)) and False)
        assert sorted(seen) == list(range(6)) and torch.equal(seen[5][1], last)
        for r in range(6):
            assert torch.equal(seen[r][1], model.think(idx, r))
    assert seen[0][0].shape == (2, 7, 2, 32)
    z1, z0 = seen[1][0], seen[0][0]
    assert ((z1 - z0).norm() / z1.norm()).item() > 1e-3  # the passes do move the thoughts


def recorded(stop, passes):
    """The stop predicate stop, also appending every r it is called with to passes."""
    def record(r, z, h):
        passes.append(r)
        return stop(r, z, h)
    return record


@pytest.mark.parametrize('K', [1, 2])
def test_adaptive_jacobi_tolerance_zero_is_exact_and_a_huge_one_is_one_pass(K):
    model = randomize(tiny(n_thoughts=K), std=0.5)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(K))
    bound = K * (idx.size(1) - 1)
    zero, huge = [], []  # the r of every stop call: the last is the number of passes used
    with torch.no_grad():
        exact = model.sequential_logits(idx)
        at_zero = model.embed_out(model.think(idx, bound, stop=recorded(settled(0.0), zero)))
        one = model.embed_out(model.think(idx, bound, stop=recorded(settled(1e30), huge)))
        fixed_one, _ = model(idx, n_jacobi=1)
    used_at_zero, used_huge = zero[-1], huge[-1]
    assert 1 <= used_at_zero <= bound and used_huge == 1
    torch.testing.assert_close(at_zero, exact, atol=1e-5, rtol=1e-5)
    assert torch.equal(one, fixed_one)
    assert (fixed_one - exact).abs().max() > 1e-3  # one pass is not exact: the two checks above can tell


# -----------------------------------------------------------------------------
# decoding: the prompt's thoughts (prefill), then token by token through the caches

def test_thought_prefill_uses_n_jacobi_passes():
    model = tiny(block_size=BLOCK, n_thoughts=1, n_jacobi=3)
    prompt = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    (_, logits), = generate_stream(model, prompt, 1, temperature=0)  # default: config.n_jacobi over the prompt
    with torch.no_grad():
        ref, _ = model(prompt)
    torch.testing.assert_close(logits, ref[:, -1], atol=1e-5, rtol=1e-5)


def test_generate_prefill_with_a_jacobi_tolerance():
    model = randomize(tiny(n_thoughts=1), std=0.5)
    prompt = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = model.sequential_logits(prompt)[:, -1]
        one, _ = model(prompt, n_jacobi=1)
    passes = []
    (_, at_zero), = generate_stream(model, prompt, 1, temperature=0, stop=recorded(settled(0.0), passes))
    (_, huge), = generate_stream(model, prompt, 1, temperature=0, stop=settled(1e30))
    torch.testing.assert_close(at_zero, exact, atol=1e-5, rtol=1e-5)
    assert 1 <= passes[-1] <= prompt.size(1) - 1
    torch.testing.assert_close(huge, one[:, -1], atol=1e-5, rtol=1e-5)  # one pass: not exact, as the next line shows
    assert (huge - exact).abs().max() > 1e-3
    assert torch.equal(model.generate(prompt, 6, temperature=0, stop=settled(0.0)),
                       model.generate(prompt, 6, temperature=0, n_jacobi=prompt.size(1) - 1))


@pytest.mark.parametrize('K', [1, 2])
def test_cached_thought_decoding_is_exact(K):
    model = tiny(block_size=BLOCK, n_thoughts=K)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    steps = list(generate_stream(model, prompt, 12, temperature=0, n_jacobi=K * prompt.size(1)))
    tokens = torch.cat([prompt] + [t for t, _ in steps], dim=1)
    with torch.no_grad():
        ref = sequential_thought_logits(model, tokens)
    for i, (_, logits) in enumerate(steps):  # step i predicts token T+i from the logits at T+i-1
        torch.testing.assert_close(logits, ref[:, prompt.size(1) - 1 + i], atol=1e-5, rtol=1e-5)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(tokens, uncached)


@pytest.mark.parametrize('kw', [dict(n_ponder=3), dict(n_ponder=2, ponder_multiply=True), dict()])
def test_cached_decoding_equals_uncached(kw):
    model = tiny(block_size=BLOCK, **kw)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    steps = list(generate_stream(model, prompt, 15, temperature=0))
    tokens = torch.cat([prompt] + [t for t, _ in steps], dim=1)
    assert torch.equal(tokens, model.generate(prompt, 15, temperature=0, use_cache=False))
    with torch.no_grad():
        ref, _ = model(tokens)
    for i, (_, logits) in enumerate(steps):
        torch.testing.assert_close(logits, ref[:, prompt.size(1) - 1 + i], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# training: the gradients, and a tiny model trained here on a learnable pattern

def test_gradients_flow_through_stage_building(monkeypatch):
    model = tiny(block_size=BLOCK, n_thoughts=1).train()
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        _, loss = model(idx, idx, n_jacobi=2)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads()
    run_stages = model.run_stages
    calls = []

    def detach_first_pass(stages, cache=None, kept=None):  # the stage-building pass is the first call
        out = run_stages(stages, cache, kept)
        calls.append(1)
        return out.detach() if len(calls) == 1 else out

    monkeypatch.setattr(model, 'run_stages', detach_first_pass)
    detached = grads()
    assert len(calls) == 4  # building + 2 Jacobi + final
    assert (full - detached).abs().max() > 1e-6


PERIOD, SEQ, VOCAB = 4, 16, 16


def periodic_batch(gen, batch):
    """Sequences that repeat a random pattern of PERIOD tokens: (x, y) (B, SEQ), y the next tokens."""
    pattern = torch.randint(1, VOCAB, (batch, PERIOD), generator=gen)
    seq = pattern.repeat(1, SEQ // PERIOD + 1)[:, :SEQ + 1]
    return seq[:, :-1], seq[:, 1:]


@pytest.fixture(scope='module')
def trained():
    """A K=1 model trained for 40 AdamW steps (R drawn from 1..3) until it has learned to copy the pattern: after
    the first period the loss is near 0. Trained, its Jacobi passes contract, as the papers' do."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_thoughts=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for it in range(40):
        x, y = periodic_batch(gen, 16)
        _, loss = model(x, y, n_jacobi=1 + it % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(VOCAB - 1) + 0.5  # only the first period is unpredictable
    return model.eval()


def test_convergence_is_non_increasing_on_a_trained_model(trained):
    """What is asserted: per pass, the change of the thoughts and their distance to the exact ones never grow
    (beyond 1e-6: float32 round-off, which is the floor the exact and the parallel computations agree to), and
    while above that floor each pass at least halves the change (a contraction, not a mere drift)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.cat(periodic_batch(gen, 1), dim=1)[0] for _ in range(8)]).numpy()
    bound = SEQ - 1
    rows = thought_rows(trained, ids, SEQ, bound, tols=(1e-3,))
    change = [rows[f'R={r}']['change'] for r in range(1, bound + 1)]
    dist = [rows[f'R={r}']['distance_to_exact'] for r in range(bound + 1)]
    floor = 1e-6
    for seq in (change, dist):
        assert all(b <= a + floor for a, b in zip(seq, seq[1:])), seq
    assert all(b <= 0.5 * a for a, b in zip(change, change[1:]) if a > 10 * floor), change
    assert dist[0] > 1e-2 and dist[-1] < floor  # the figures do go somewhere: from far to exact
    assert 1 < rows['tol=0.001']['passes'] < bound  # adaptive stops long before the exactness bound
