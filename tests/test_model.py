"""model.py's GPT-NeoX trunk: the Pythia presets' parameter counts, parity with Hugging Face transformers'
GPTNeoXForCausalLM (logits and greedy tokens; loss and every gradient; with and without the workshop's kernels), the
chunked KV cache, the sampling filters, the init, and the config's checks. PonderLM-2's thoughts: test_thoughts.py;
the other methods: test_methods.py.

    python -m pytest tests/test_model.py -q
"""
import math

import pytest
import torch

from model import GPT, GPTConfig, sample
from nanoponder import kernels
from nanoponder.hf import load_pretrained
from helpers import tiny

BLOCK = 64  # the context of the tiny models here, tiny(block_size=BLOCK)


# -----------------------------------------------------------------------------
# architecture

PYTHIA_PARAMS = {  # the Pythia paper's table: total, non-embedding
    'pythia-70m': (70_426_624, 18_915_328),
    'pythia-160m': (162_322_944, 85_056_000),
    'pythia-410m': (405_334_016, 302_311_424),
    'pythia-1b': (1_011_781_632, 805_736_448),
    'pythia-1.4b': (1_414_647_808, 1_208_602_624),
    'pythia-2.8b': (2_775_208_960, 2_517_652_480),
}


@pytest.mark.parametrize('name', PYTHIA_PARAMS)
def test_preset_parameter_counts_match_pythia_paper(name):
    with torch.device('meta'):
        model = GPT(GPTConfig.preset(name))
    total, non_embedding = PYTHIA_PARAMS[name]
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == non_embedding


def random_hf_model(tmp_path, parallel_residual, rotary_pct):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.GPTNeoXConfig(
        vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
        max_position_embeddings=64, rotary_pct=rotary_pct, use_parallel_residual=parallel_residual)
    torch.manual_seed(1)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's 0.02 init makes near-uniform logits; larger weights make parity meaningful
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize('with_kernels', [False, True])
@pytest.mark.parametrize('parallel_residual,rotary_pct', [(True, 0.25), (False, 1.0), (True, 1.0), (False, 0.25)])
def test_parity_with_hf_gpt_neox(tmp_path, parallel_residual, rotary_pct, with_kernels):
    """model.py's plain path (what an export runs in transformers), and with the workshop's kernels installed (what
    the scripts run), against HF: the logits and greedy decoding."""
    hf = random_hf_model(tmp_path, parallel_residual, rotary_pct)
    model = load_pretrained(str(tmp_path)).eval()
    if with_kernels:
        kernels.install(model)
    assert model.config.parallel_residual == parallel_residual and model.config.rotary_pct == rotary_pct
    assert not model.config.scale_embeds  # a stock checkpoint has unscaled embeddings
    idx = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
    logits, _ = model(idx)
    assert ref.abs().max() > 1.0  # the check below would be vacuous on near-zero logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    prompt = idx[:1, :8]
    ref_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert torch.equal(model.generate(prompt, 20, temperature=0), ref_tokens)


@pytest.mark.parametrize('with_kernels', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_loss_and_gradients_equal_hf_gpt_neox(tmp_path, dtype, with_kernels):
    """Training against the peer: the loss (model.cross_entropy, or the kernels' chunked one) and every weight's
    gradient (through the in-place rotary on q and k, and the kernels' attention in blocks) equal HF's, in fp32 and
    under bf16 autocast, where HF upcasts the logits for its loss."""
    hf = random_hf_model(tmp_path, True, 0.25)
    model = load_pretrained(str(tmp_path))
    if with_kernels:
        kernels.install(model)
    idx = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast('cpu', dtype, enabled=dtype != torch.float32):
        ref = hf(idx, labels=idx).loss  # HF shifts the labels: logits at t predict idx[t + 1]
        _, loss = model(idx[:, :-1], idx[:, 1:])
    ref.backward()
    loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ref.item() > 1.0
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    ours = dict(model.named_parameters())
    theirs = {name.removeprefix('gpt_neox.'): p for name, p in hf.named_parameters()}
    theirs['embed_out.weight'] = hf.get_output_embeddings().weight
    assert set(ours) <= set(theirs)
    for name, p in ours.items():
        g = theirs[name].grad
        assert g.abs().max() > 0, name
        err = (p.grad - g).abs().max() / g.abs().max()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err.item())


def test_chunked_cache_equals_one_pass():
    """Attention with a cache and several new positions needs a shifted causal mask (not SDPA's is_causal)."""
    from model import KVCache
    model = tiny(block_size=BLOCK)
    x = torch.randn(2, 12, 32)
    pos = torch.arange(12)
    full = model.trunk(x, pos)
    cache = KVCache(model.config, 2, 12, 'cpu', torch.float32)
    parts = [model.trunk(x[:, :5], pos[:5], cache), model.trunk(x[:, 5:6], pos[5:6], cache),
             model.trunk(x[:, 6:], pos[6:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# decoding

def test_a_prompt_longer_than_block_size_is_a_clear_error():
    # new tokens past the context slide the window (test_sample.py); a prompt that does not fit is refused
    model = tiny(block_size=16)
    with pytest.raises(ValueError, match='block_size'):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 7)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert sample(logits, temperature=0).item() == 1
    torch.manual_seed(0)
    assert all(sample(logits, top_k=1).item() == 1 for _ in range(20))
    assert all(sample(logits, top_p=0.1).item() == 1 for _ in range(20))
    drawn = {sample(logits, top_k=2).item() for _ in range(200)}
    assert drawn == {1, 2}


# -----------------------------------------------------------------------------
# the init and the config

@pytest.mark.parametrize('kw,passes', [(dict(n_thoughts=1), 2), (dict(n_thoughts=2), 3), (dict(n_ponder=3), 4),
                                       (dict(), 1)])
def test_ponder_init_statistics(kw, passes):
    H, L = 256, 4
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=L, n_head=4, n_embd=H, **kw))
    sigma = math.sqrt(2 / (5 * H))
    trunc = 0.986  # std of a normal truncated at +-3 sigma, in units of sigma
    proj = sigma / math.sqrt(2 * L * passes)
    for name, p in model.named_parameters():
        if name.endswith('bias'):
            assert p.abs().max() == 0, name
        elif 'layernorm' in name or 'layer_norm' in name:
            assert torch.all(p == 1), name
        else:
            want = proj if name.endswith(('attention.dense.weight', 'dense_4h_to_h.weight')) else sigma
            assert p.std().item() == pytest.approx(trunc * want, rel=0.05), name
            assert p.abs().max().item() <= 3 * want + 1e-7, name


def test_pythia_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=256, weight_init='normal'))
    for name, p in model.named_parameters():
        if name.endswith('weight') and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_conflicting_methods_are_rejected():
    with pytest.raises(ValueError, match='n_thoughts and n_ponder'):
        GPTConfig(n_thoughts=1, n_ponder=1)
