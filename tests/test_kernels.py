"""The workshop's kernels (nanoponder/kernels.py) against model.py's plain PyTorch, which they replace behind its two
seams: the chunked cross-entropy against F.cross_entropy, attention in blocks against SDPA, the 'auto' rule, and a
whole training step with and without them.

    python -m pytest tests/test_kernels.py -q
"""
import pytest
import torch
from torch.nn import functional as F

import model as model_module
from model import Attention
from nanoponder import kernels
from helpers import tiny

BLOCK = 64  # the context of the tiny models here, tiny(block_size=BLOCK)


def attention_kernels(model):
    return {m.attend for m in model.modules() if isinstance(m, Attention)}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch(dtype):
    """kernels.cross_entropy, a few rows at a time, against F.cross_entropy on the logits upcast to fp32 (model.py's
    cross_entropy): the loss, ignore_index -1, the gradient (in the logits' dtype), rows that do not divide N, and
    nan when nothing is kept."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[0, 5, 36]] = -1
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-1)
    torch.testing.assert_close(model_module.cross_entropy(logits, targets), ref, atol=0, rtol=0)
    (2 * ref).backward()
    ref_grad, logits.grad = logits.grad, None
    for rows in (1, 8, 64):
        loss = kernels.cross_entropy(logits, targets, rows)
        (2 * loss).backward()
        assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits.grad, ref_grad, atol=1e-6, rtol=0)
        assert logits.grad[0].abs().max() == 0  # an ignored row gets no gradient
        logits.grad = None
    assert kernels.cross_entropy(logits, torch.full_like(targets, -1)).isnan()
    assert model_module.cross_entropy(logits, torch.full_like(targets, -1)).isnan()


def test_install_fills_both_seams_and_a_model_without_it_runs_plain_pytorch():
    """A GPT as built (and as an export runs it in transformers) attends with model.causal_attention and takes
    model.cross_entropy; install puts the kernels in, 'auto' attention and the chunked loss."""
    model = tiny(block_size=BLOCK, n_thoughts=1)
    assert attention_kernels(model) == {model_module.causal_attention}
    assert model.cross_entropy is model_module.cross_entropy
    assert kernels.install(model) is model
    assert attention_kernels(model) == {kernels.attend} and model.cross_entropy is kernels.cross_entropy


@pytest.mark.parametrize('method', ['vanilla', 'ponderlm2-k1', 'ponderlm1-n2'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_a_training_step_with_the_kernels_equals_plain_pytorch(method, dtype):
    """The loss and every gradient of one training step with the kernels installed equal model.py's plain path, in
    fp32 to float precision and under bf16 autocast to its rounding."""
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for install in (False, True):
        model = tiny(method, block_size=BLOCK).train()
        if install:
            kernels.install(model)
        with torch.autocast('cpu', dtype, enabled=dtype != torch.float32):
            loss = model(idx[:, :-1], idx[:, 1:], n_jacobi=2)[1]
        loss.backward()
        results.append([loss] + [p.grad for p in model.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for plain, fast in zip(*results):
        torch.testing.assert_close(fast.float(), plain.float(), atol=tol, rtol=tol)


def test_attention_backend_choice(monkeypatch):
    """'blocks' is what 'auto' runs on the CPU, 'sdpa' the same to float precision; 'flash' needs flash_attn, and
    then CUDA in bf16/fp16."""
    model = kernels.install(tiny(block_size=BLOCK, n_thoughts=1))
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    auto = model(idx)[0]
    auto_tokens = model.generate(idx[:1, :4], 6, temperature=0)
    kernels.set_backend(model, 'blocks')
    assert torch.equal(model(idx)[0], auto)
    kernels.set_backend(model, 'sdpa')
    assert attention_kernels(model) == {model_module.causal_attention}
    sdpa = model(idx)[0]
    assert not torch.equal(sdpa, auto)  # another kernel, or this test could not tell them apart
    torch.testing.assert_close(sdpa, auto, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(idx[:1, :4], 6, temperature=0), auto_tokens)
    with pytest.raises(ValueError, match="one of auto, sdpa, flash, blocks"):
        kernels.set_backend(model, 'xformers')

    monkeypatch.setattr(kernels, 'flash_attn_func', None)  # as without the package
    with pytest.raises(ValueError, match="'flash' needs the flash_attn package"):
        kernels.set_backend(model, 'flash')
    assert attention_kernels(model) == {model_module.causal_attention}  # unchanged

    def fake_flash(*args, **kwargs):
        raise AssertionError('flash-attn called where it cannot run')

    monkeypatch.setattr(kernels, 'flash_attn_func', fake_flash)  # installed, but this is a CPU
    kernels.set_backend(model, 'auto')
    assert torch.equal(model(idx)[0], auto)  # auto does not pick flash-attn here
    kernels.set_backend(model, 'flash')
    with pytest.raises(ValueError, match="runs on CUDA in bfloat16 or float16"):
        model(idx)


@pytest.mark.parametrize('T', [5, 128, 300])
def test_attend_blocks_equals_sdpa(monkeypatch, T):
    """Causal attention a block of queries at a time (what 'auto' runs on a CPU) against SDPA: outputs and
    gradients, T below, at and across block boundaries (blocks of 64 here), in fp32 to float precision and in bf16
    to its rounding of the probabilities."""
    monkeypatch.setattr(kernels, 'BLOCK', 64)
    g = torch.Generator().manual_seed(T)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        q, k, v = (torch.randn(2, 2, T, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(2, 2, T, 16, generator=g).to(dtype)
        results = []
        for fn in (kernels.attend_blocks, lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True)):
            y = fn(q, k, v)
            y.backward(grad)
            results.append([y] + [t.grad for t in (q, k, v)])
            q.grad = k.grad = v.grad = None
        for ours, ref in zip(*results):
            assert ours.dtype == dtype
            torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)


def test_auto_attention_is_blocks_on_a_cpu_up_to_its_length(monkeypatch):
    calls = []
    original = kernels.attend_blocks
    monkeypatch.setattr(kernels, 'attend_blocks', lambda *a: calls.append(a[0].dtype) or original(*a))
    model = kernels.install(tiny(block_size=BLOCK, n_thoughts=1))
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    model(idx)
    assert set(calls) == {torch.float32} and len(calls) > 0
    calls.clear()
    with torch.autocast('cpu', torch.bfloat16):
        model(idx)
        assert set(calls) == {torch.bfloat16} and len(calls) > 0
        calls.clear()
        monkeypatch.setattr(kernels, 'BLOCKS_MAX_LEN', 10)  # the 10 tokens' stage pass, not the 20 slots'
        model(idx, n_jacobi=0)
        assert len(calls) == model.config.n_layer
        calls.clear()
        model.generate(idx[:1, :4], 2, temperature=0)
        prefill = len(calls)
        model.generate(idx[:1, :4], 6, temperature=0)  # the prompt's passes again; each new token: SDPA on the cache
        assert prefill > 0 and len(calls) == 2 * prefill
    assert kernels.blocks_suit('cpu', torch.bfloat16, 8) and kernels.blocks_suit('cpu', torch.float32, 8)
    assert not kernels.blocks_suit('cuda', torch.bfloat16, 8) and not kernels.blocks_suit('cpu', torch.float16, 8)
    assert not kernels.blocks_suit('cpu', torch.float32, kernels.BLOCKS_MAX_LEN + 1)
