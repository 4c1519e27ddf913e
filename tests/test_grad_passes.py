"""Truncated backpropagation through PonderLM-2's Jacobi passes (train.py's jacobi_grad_passes G, the model's
jacobi_grad_passes): G = 0 is the full training step as the method defines it; G >= 1 has the same forward value and
the gradient of a slow reference that detaches the thoughts by hand before the last G passes; the FLOPs of a step
are what torch's counter counts; bad values are one error line.

    python -m pytest tests/test_grad_passes.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from nanoponder.cost import flops_per_token
from helpers import TINY_MODEL, assert_one_error, make_data, metrics, randomize_matrices, run_train, tiny

T = 9


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (2, T), generator=g), torch.randint(0, 97, (2, T), generator=g)


def think_reference(model, idx, R, G=0):
    """PonderLM-2's parallel form spelled out: K stages, R Jacobi passes and a final one over all K+1 slots, each
    thought the previous pass's output at the slot before. G >= 1: before the first of the last G passes (or before
    the first pass over all slots, when R+1 <= G), the thoughts are detached by hand."""
    K = model.config.n_thoughts
    e = model.embed(idx)
    stages = [e]
    for _ in range(K):
        stages = [e] + list(model.run_stages(stages).unbind(dim=2))
    for r in range(R + 1):
        if G and r == max(0, R + 1 - G):
            stages = [e] + [z.detach() for z in stages[1:]]
        h = model.run_stages(stages)
        stages = [e] + list(h[:, :, :K].unbind(dim=2))
    return h[:, :, K]


def loss_of(model, x, y, R, reference=False, G=0):
    if reference:
        logits = model.embed_out(think_reference(model, x, R, G))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return model(x, y, n_jacobi=R)[1]


def train_steps(model, R_per_step, reference=False, G=0):
    """A few AdamW steps; -> the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step, R in enumerate(R_per_step):
        x, y = batch(step)
        loss = loss_of(model, x, y, R, reference, G)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('K', [1, 2])
def test_g0_is_the_full_training_step_bit_for_bit(K):
    ours, ref = (randomize_matrices(tiny(n_thoughts=K), std=0.2).train() for _ in range(2))
    assert ours.jacobi_grad_passes == 0
    Rs = [2, 4, 3]
    assert train_steps(ours, Rs) == train_steps(ref, Rs, reference=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


@pytest.mark.parametrize('K, R, G', [(1, 3, 1), (1, 3, 2), (2, 2, 2), (1, 1, 2), (1, 1, 5)])
def test_g_passes_keep_the_forward_and_give_the_gradient_of_detached_thoughts(K, R, G):
    """(1, 1, 2) and (1, 1, 5): R+1 <= G, every pass over all slots with a graph, the stages without."""
    model = randomize_matrices(tiny(n_thoughts=K), std=0.2).train()
    x, y = batch()
    full = loss_of(model, x, y, R)
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.jacobi_grad_passes = G
    truncated = loss_of(model, x, y, R)
    assert torch.equal(truncated, full)  # the forward's value: the same computation, bit for bit (eager, CPU)
    truncated.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y, R, reference=True, G=G).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    # the embeddings keep their gradient, and truncation changes it: the test can tell
    assert model.embed_in.weight.grad.abs().sum() > 0
    differs = max((a - b).abs().max().item() for a, b in zip(ours, full_grads))
    assert differs > 1e-6


@pytest.mark.parametrize('G', [0, 1, 2])
def test_the_flops_of_a_training_step_are_torchs_count(G):
    """flops_per_token(grad_passes=G) x tokens against torch's FLOP counter around one forward and backward, with
    SDPA's math backend so that attention is counted as its matmuls (q.k and attn.v, over the full square as
    cost.py counts it): the stages and every pass forward, backward through the head and the last G passes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    for K, R in ((1, 3), (2, 2)):
        config = GPTConfig(**{**TINY_MODEL, 'block_size': T}, n_thoughts=K)
        model = GPT(config).train()
        model.jacobi_grad_passes = G
        x, y = batch()
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, y, n_jacobi=R)[1].backward()
        assert counter.get_total_flops() == flops_per_token(config, R, grad_passes=G) * x.numel(), (K, R)
    # the mean over the R training draws, and the saving: G=1 at R in 2..4 costs less than full BPTT
    config = GPTConfig(**{**TINY_MODEL, 'block_size': T}, n_thoughts=1)
    mean = flops_per_token(config, (2, 4), grad_passes=G)
    assert mean == pytest.approx(sum(flops_per_token(config, R, grad_passes=G) for R in (2, 3, 4)) / 3)
    if G:
        assert mean < flops_per_token(config, (2, 4))


@pytest.mark.parametrize('args, needles', [
    (['--jacobi_grad_passes=-1'], ['jacobi_grad_passes must be a whole number >= 0', 'got -1']),
    (['--jacobi_grad_passes=1', '--n_thoughts=0'], ['jacobi_grad_passes=1 truncates', 'n_thoughts is 0']),
    # (the embedding controls of the CPU experiment: a pretrained model keeps its own)
    (['--init_from=EleutherAI/pythia-14m', '--embed_scale_rule=sqrt2.5H'], ['embed_scale_rule and init_shrink_passes',
                                                                            'drop them'])])
def test_bad_grad_passes_are_one_error_line_before_any_work(tmp_path, args, needles):
    r = run_train(tmp_path, '--max_iters=2', *args, check=False)
    assert_one_error(r, 2, *needles)
    assert not (tmp_path / 'out').exists()


def test_a_vanilla_checkpoint_resumed_with_grad_passes_is_refused_and_g_is_recorded(tmp_path):
    make_data(tmp_path / 'data')
    run_train(tmp_path, '--max_iters=2', '--eval_interval=2', '--n_thoughts=0', out='v')
    r = run_train(tmp_path, '--max_iters=4', '--init_from=resume', '--n_thoughts=0', '--jacobi_grad_passes=1',
                  out='v', check=False)
    assert_one_error(r, 2, 'jacobi_grad_passes=1 truncates', 'vanilla')
    r = run_train(tmp_path, '--max_iters=2', '--eval_interval=2', '--jacobi_grad_passes=1', out='g1')
    assert 'backward through the last 1' in r.stdout
    # train.py gives G to the model: the first step's loss is the full run's, the second (after a truncated
    # gradient) is not
    run_train(tmp_path, '--max_iters=2', '--eval_interval=2', out='g0')
    (first, second), (first_full, second_full) = (metrics(tmp_path / out)[0] for out in ('g1', 'g0'))
    assert first == first_full and second != second_full
    ckpt = torch.load(tmp_path / 'g1' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['config']['jacobi_grad_passes'] == 1
    r = run_train(tmp_path, '--max_iters=3', '--eval_interval=3', '--init_from=resume', out='g1')
    assert 'jacobi_grad_passes 0' in r.stdout and 'not an exact resume' in r.stdout
