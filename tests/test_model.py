"""model.py against a real peer (HF transformers' GPTNeoXForCausalLM) and against plain sequential references.

    python -m pytest tests/test_model.py -q
"""
import json
import math
import os

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig, generate_stream, sample
from nanoponder import kernels
from nanoponder.cost import estimate_mfu, flops_per_token
from nanoponder.hf import config_from_hf, jacobi_train_range_from_hf, load_pretrained
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
# PonderLM-2: the parallel Jacobi form against the sequential definition

def sequential_thought_logits(model, idx):
    """The definition, one slot at a time: feed e_t, then K times feed back the last output, all at position t.
    No cache, no Jacobi: the whole slot sequence so far is recomputed for every slot. Returns (B, T, V)."""
    K = model.config.n_thoughts
    slots, positions, logits = [], [], []
    for t in range(idx.size(1)):
        slots.append(model.embed_in(idx[:, t]) * math.sqrt(2.5 * model.config.n_embd))
        positions.append(t)
        for _ in range(K + 1):
            h = model.trunk(torch.stack(slots, dim=1), torch.tensor(positions))[:, -1]  # (B, C)
            if len(slots) % (K + 1) == 0:  # the token's last thought was fed: h predicts the next token
                break
            slots.append(h)
            positions.append(t)
        logits.append(model.embed_out(h))
    return torch.stack(logits, dim=1)


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


def test_thought_prefill_uses_n_jacobi_passes():
    model = tiny(block_size=BLOCK, n_thoughts=1, n_jacobi=3)
    prompt = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    (_, logits), = generate_stream(model, prompt, 1, temperature=0)  # default: config.n_jacobi over the prompt
    with torch.no_grad():
        ref, _ = model(prompt)
    torch.testing.assert_close(logits, ref[:, -1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# PonderLM v1 and vanilla decoding

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


def test_ponder_matches_definition():
    model = tiny(block_size=BLOCK, n_ponder=2, ponder_multiply=True)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    s, pos = math.sqrt(32), torch.arange(7)
    with torch.no_grad():
        c = model.embed_in(idx) * s * 2
        for _ in range(2):
            p = torch.softmax(model.embed_out(model.trunk(c, pos)), dim=-1)
            c = c + torch.einsum('btv,vc->btc', p, model.embed_in.weight * s)
        ref = model.embed_out(model.trunk(c, pos))
        logits, _ = model(idx)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


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
# training-side behaviour

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

    def detach_first_pass(stages, cache=None):  # the stage-building pass is the first call
        out = run_stages(stages, cache)
        calls.append(1)
        return out.detach() if len(calls) == 1 else out

    monkeypatch.setattr(model, 'run_stages', detach_first_pass)
    detached = grads()
    assert len(calls) == 4  # building + 2 Jacobi + final
    assert (full - detached).abs().max() > 1e-6


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


def test_flops_count_every_pass():
    # with attention and the vocabulary projection made negligible, K=1 costs 3+2R vanilla passes: building (1),
    # R Jacobi and the final pass over twice the slots (2 each)
    vanilla = GPT(GPTConfig(block_size=4, vocab_size=2, n_layer=2, n_head=4, n_embd=256, n_thoughts=0))
    cfg = dict(block_size=4, vocab_size=2, n_layer=2, n_head=4, n_embd=256)
    ponder = GPT(GPTConfig(**cfg, n_thoughts=1))
    ratio = flops_per_token(ponder.config, 3, training=True) / flops_per_token(vanilla.config, training=True)
    assert ratio == pytest.approx(3 + 2 * 3, rel=0.02)
    v1 = GPT(GPTConfig(**cfg, n_ponder=3))
    assert flops_per_token(v1.config, training=False) / flops_per_token(vanilla.config, training=False) == \
        pytest.approx(4, rel=0.02)
    assert estimate_mfu(ponder.config, 1000.0, 3, peak_flops=1e12) == \
        pytest.approx(flops_per_token(ponder.config, 3) * 1e-9)


def test_conflicting_methods_are_rejected():
    with pytest.raises(ValueError, match='n_thoughts and n_ponder'):
        GPTConfig(n_thoughts=1, n_ponder=1)


# -----------------------------------------------------------------------------
# loading checkpoints

def test_config_from_hf_reads_old_keys_and_ponder_keys():
    hf = dict(vocab_size=50304, num_hidden_layers=6, num_attention_heads=8, hidden_size=512,
              max_position_embeddings=2048, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False,
              layer_norm_eps=1e-6, num_latent_thoughts=2, num_jacobi_iterations=4, random_jacobi_iterations=False,
              scale_embeds=True)
    cfg = config_from_hf(hf)
    assert (cfg.rotary_pct, cfg.rotary_base, cfg.parallel_residual, cfg.layer_norm_eps) == (0.5, 5000, False, 1e-6)
    assert (cfg.n_thoughts, cfg.n_jacobi, jacobi_train_range_from_hf(hf), cfg.scale_embeds) == (2, 4, (4, 4), True)
    v1 = config_from_hf(dict(vocab_size=11, num_hidden_layers=1, num_attention_heads=1, hidden_size=8,
                             partial_rotary_factor=1.0, rope_theta=500.0, ponderinglm=True, pondering_steps=3,
                             mutiply_pondering_steps=True))
    assert (v1.n_ponder, v1.ponder_multiply, v1.rotary_pct, v1.rotary_base) == (3, True, 1.0, 500.0)


@pytest.mark.parametrize('key,value,match', [('interpolation', True, 'not supported'),
                                             ('hidden_act', 'relu', 'hidden_act')])
def test_unsupported_configs_are_clear_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(dict(vocab_size=11, num_hidden_layers=1, num_attention_heads=1, hidden_size=8, **{key: value}))


def save_tiny_checkpoint(path, model, config_extra=None, fmt='safetensors', shards=1, dtype=None):
    from safetensors.torch import save_file
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    hf_config = dict(vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                     hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                     max_position_embeddings=cfg.block_size, rotary_pct=cfg.rotary_pct,
                     **(config_extra or {}))
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf_config, f)
    sd = {('' if k == 'embed_out.weight' else 'gpt_neox.') + k: v.to(dtype or v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    sd['gpt_neox.layers.0.attention.rotary_emb.inv_freq'] = torch.ones(2)  # old checkpoints carry buffers
    keys = sorted(sd)
    if fmt == 'bin':
        torch.save(sd, os.path.join(path, 'pytorch_model.bin'))
    elif shards == 1:
        save_file(sd, os.path.join(path, 'model.safetensors'))
    else:
        weight_map = {}
        for i in range(shards):
            name = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
            part = {k: sd[k] for k in keys[i::shards]}
            save_file(part, os.path.join(path, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'weight_map': weight_map}, f)
    return sd


@pytest.mark.parametrize('fmt,shards', [('safetensors', 1), ('safetensors', 3), ('bin', 1)])
def test_from_pretrained_round_trip_of_a_thought_model(tmp_path, fmt, shards):
    model = tiny(block_size=BLOCK, n_thoughts=2)
    save_tiny_checkpoint(tmp_path, model, dict(num_latent_thoughts=2, num_jacobi_iterations=3, scale_embeds=True),
                         fmt=fmt, shards=shards)
    loaded = load_pretrained(str(tmp_path)).eval()
    assert (loaded.config.n_thoughts, loaded.config.scale_embeds) == (2, True)
    idx = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_from_pretrained_loads_bf16_weights_and_overrides(tmp_path):
    model = tiny(block_size=BLOCK)
    save_tiny_checkpoint(tmp_path, model, dtype=torch.bfloat16)
    loaded = load_pretrained(str(tmp_path), n_jacobi=5)
    assert loaded.embed_in.weight.dtype == torch.float32 and loaded.config.n_jacobi == 5
    torch.testing.assert_close(loaded.embed_in.weight, model.embed_in.weight.bfloat16().float())
    with pytest.raises(ValueError, match='unknown GPTConfig'):
        load_pretrained(str(tmp_path), n_thought=1)


def test_missing_or_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import save_file
    sd = save_tiny_checkpoint(tmp_path, tiny(block_size=BLOCK))
    del sd['gpt_neox.layers.1.mlp.dense_h_to_4h.bias']
    sd['gpt_neox.layers.1.mlp.extra'] = torch.zeros(1)
    save_file(sd, os.path.join(tmp_path, 'model.safetensors'))
    with pytest.raises(ValueError, match=r'layers\.1\.mlp\.dense_h_to_4h\.bias.*layers\.1\.mlp\.extra'):
        load_pretrained(str(tmp_path))


def test_hub_download_failure_is_one_clear_error(monkeypatch):
    pytest.importorskip('huggingface_hub')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(RuntimeError, match='Hugging Face Hub'):
        load_pretrained('no-such-user/no-such-model-for-tests')
