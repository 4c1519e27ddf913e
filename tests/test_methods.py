"""The methods besides PonderLM-2's thoughts (test_thoughts.py) against their definitions: PonderLM (N passes, each
adding the expected next-token embedding), and the three baselines of the PonderLM papers (Pause, Loop, hidden-state
feedback) against slow, obviously-correct references written here from the official GPT-NeoX files' definitions
(LUMIA-Group/PonderLM-2, modeling_gpt_neox_addpausetoken.py, ..._addhidden_weightshare.py, ..._addhidden.py): the
training forward, cached greedy decoding, the init, the FLOPs of every pass and the config checks. Their Hugging
Face directories, ours and the official code's: test_hf.py.

    python -m pytest tests/test_methods.py -q
"""
import itertools
import math
from dataclasses import replace

import pytest
import torch

from model import GPT, METHOD_COUNTS, GPTConfig, generate_stream, prefill
from nanoponder.cost import estimate_mfu, flops_per_token, inference_flops_per_token, kv_cache_slots, plan_memory
from nanoponder.methods import method_fields
from helpers import TINY_MODEL, randomize_matrices, tiny

V = TINY_MODEL['vocab_size']
PAUSE_ID = V - 1  # the last row: the tiny models' vocabulary has no room for the official 50288
NEW = {'pause-k2': dict(n_pause=2, pause_token_id=PAUSE_ID), 'loop-k2': dict(n_loop=2), 'hidden-n2': dict(n_hidden=2)}
TOL = 1e-5  # fp32
BLOCK = 64  # the context of the tiny models of test_ponder_matches_definition, tiny(block_size=BLOCK)


def new_model(name, **config):
    """A tiny model of the method, with weights large enough that its logits are far from uniform."""
    return randomize_matrices(tiny('vanilla', **{**NEW[name], **config}))


def tokens(shape, seed):
    # ids below PAUSE_ID: a real token is never the pause row (as no tokenizer produces it)
    return torch.randint(0, PAUSE_ID, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the references: every Block in order, no cache, the positions spelled out

def stack(model, x, pos):
    """The layer stack once over x (B, S, C) at position ids pos (a list of S ints), without a cache."""
    pos = torch.tensor(pos)
    cos, sin = (table[pos].to(x.dtype)[:, None, None] for table in (model.rope_cos, model.rope_sin))
    for i in range(model.config.n_layer):
        x = model.layers[i](x, cos, sin)
    return x


def pause_reference(model, idx):
    """Pause as defined: the slot sequence x1 P..P x2 P..P ... (K pauses after every token, each at its token's
    position id), the embeddings * sqrt(H) if scale_embeds (the official file's scale), one pass, the logits read
    at each token's last pause."""
    cfg = model.config
    B, T = idx.size()
    ids, pos, last = [], [], []
    for t in range(T):
        ids.append(idx[:, t])
        pos.append(t)
        for _ in range(cfg.n_pause):
            ids.append(torch.full((B,), cfg.pause_token_id))
            pos.append(t)
        last.append(len(ids) - 1)
    x = model.embed_in(torch.stack(ids, dim=1)) * (math.sqrt(cfg.n_embd) if cfg.scale_embeds else 1.0)
    h = model.final_layer_norm(stack(model, x, pos))
    return model.embed_out(h[:, last])


def pause_token_by_token(model, idx):
    """Pause, one token at a time: for each t the whole slot sequence up to t's last pause, its last output."""
    return torch.stack([pause_reference(model, idx[:, :t + 1])[:, -1] for t in range(idx.size(1))], dim=1)


def loop_reference(model, idx):
    """Loop, the official formula: h = E[x] * sqrt(2.5 H) (always), K+1 times every Block in order, the final
    LayerNorm once."""
    cfg = model.config
    pos = list(range(idx.size(1)))
    h = model.embed_in(idx) * math.sqrt(2.5 * cfg.n_embd)
    for _ in range(cfg.n_loop + 1):
        h = stack(model, h, pos)
    return model.embed_out(model.final_layer_norm(h))


def hidden_reference(model, idx):
    """Hidden-state feedback, the official formula: c = E[x] (no scale), N times c = c + f(c) with f the trunk
    (the stack and the final LayerNorm), then the logits of f(c)."""
    pos = list(range(idx.size(1)))
    f = lambda c: model.final_layer_norm(stack(model, c, pos))  # noqa: E731
    c = model.embed_in(idx)
    for _ in range(model.config.n_hidden):
        c = c + f(c)
    return model.embed_out(f(c))


REFERENCE = {'pause': pause_reference, 'loop': loop_reference, 'hidden': hidden_reference}


def reference(model, idx):
    return REFERENCE[model.config.method.split('-')[0]](model, idx)


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# the training forward

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


@pytest.mark.parametrize('name', NEW)
def test_forward_equals_reference(name):
    model = new_model(name)
    idx, targets = tokens((2, 9), 1), tokens((2, 9), 2)
    targets[0, 3] = -1  # ignored
    with torch.no_grad():
        logits, loss = model(idx, targets)
        ref = reference(model, idx)
        # the same weights as vanilla: the method must change the logits, or this test could not tell
        vanilla = GPT(GPTConfig(**{**vars(model.config), **dict.fromkeys(METHOD_COUNTS, 0)})).eval()
        vanilla.load_state_dict(model.state_dict())
        plain = vanilla(idx)[0]
    assert ref.std() > 0.5 and max_diff(ref, plain) > 0.1
    assert max_diff(logits, ref) < TOL, max_diff(logits, ref)
    if name.startswith('pause'):
        with torch.no_grad():
            by_token = pause_token_by_token(model, idx)
        assert max_diff(logits, by_token) < TOL, max_diff(logits, by_token)
    keep = targets >= 0  # cross-entropy over the kept targets, spelled out
    want = -ref.log_softmax(-1)[keep].gather(1, targets[keep][:, None]).mean()
    assert abs(loss.item() - want.item()) < TOL, (loss.item(), want.item())


# -----------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize('name', NEW)
def test_cached_greedy_decoding_equals_reference(name):
    # block_size 8, a prompt of 5 and 10 new tokens: the window slides (to its last 4 tokens) twice
    block = 8
    model = new_model(name, block_size=block)
    prompt = tokens((2, 5), 3)
    steps = list(generate_stream(model, prompt, 10, temperature=0))
    cached = torch.cat([prompt] + [t for t, _ in steps], dim=1)
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0, use_cache=False))
    window, out = prompt, [prompt]  # greedy decoding driven by the reference, with the documented sliding window
    with torch.no_grad():
        for i in range(10):
            logits = reference(model, window)[:, -1]
            assert max_diff(steps[i][1], logits) < TOL, (i, max_diff(steps[i][1], logits))
            out.append(logits.argmax(dim=-1, keepdim=True))
            window = torch.cat((window, out[-1]), dim=1)
            if window.size(1) > block:
                window = window[:, -(block // 2):]
    assert torch.equal(cached, torch.cat(out, dim=1))
    assert len(set(cached[:, 5:].flatten().tolist())) > 2  # not one token repeated: the comparison means something
    # a prompt fed to the caches in two chunks (several new positions after a cache)
    idx = tokens((2, 7), 4)
    with torch.no_grad():
        caches = model.new_caches(2, 7, 'cpu')
        h = torch.cat([model.next_token_states(idx[:, :3], caches), model.next_token_states(idx[:, 3:], caches)], dim=1)
        ref = reference(model, idx)
    assert max_diff(model.embed_out(h), ref) < TOL, max_diff(model.embed_out(h), ref)


# -----------------------------------------------------------------------------
# the init

@pytest.mark.parametrize('name,passes,shrink', [('pause-k2', 1, 0), ('loop-k2', 3, 0), ('hidden-n2', 3, 0),
                                                ('pause-k2', 2, 2)])  # init_shrink_passes: another method's shrink
def test_small_init_shrinks_output_projections_by_passes(name, passes, shrink):
    H, L = 256, 2
    shape = dict(block_size=8, vocab_size=V, n_layer=L, n_head=4, n_embd=H, init_shrink_passes=shrink, **NEW[name])
    torch.manual_seed(0)
    small, normal = GPT(GPTConfig(**shape)), GPT(GPTConfig(**{**shape, 'init_shrink_passes': 0}, weight_init='normal'))
    sigma = math.sqrt(2 / (5 * H))
    trunc = 0.986  # std of a normal truncated at +-3 sigma, in units of sigma
    for i in range(L):
        for proj in (small.layers[i].attention.dense, small.layers[i].mlp.dense_4h_to_h):
            assert proj.weight.std().item() == pytest.approx(trunc * sigma / math.sqrt(2 * L * passes), rel=0.05)
        assert small.layers[i].attention.query_key_value.weight.std().item() == pytest.approx(trunc * sigma, rel=0.05)
        for proj in (normal.layers[i].attention.dense, normal.layers[i].mlp.dense_4h_to_h):
            assert proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_embed_scale_rule_gives_every_method_one_factor():
    """'official' is each method's own factor (the official files'); a rule gives every method the same one."""
    H = TINY_MODEL['n_embd']
    names = ('vanilla', 'ponderlm2-k1', 'ponderlm1-n2', 'pause-k2', 'loop-k2', 'hidden-n2')
    official = [math.sqrt(H), math.sqrt(2.5 * H), math.sqrt(H), math.sqrt(H), math.sqrt(2.5 * H), 1.0]

    def scale(name, **kw):
        return GPTConfig(**TINY_MODEL, **method_fields(name), pause_token_id=PAUSE_ID, **kw).embed_scale
    assert [scale(n) for n in names] == official
    for rule, factor in (('sqrt2.5H', math.sqrt(2.5 * H)), ('sqrtH', math.sqrt(H)), ('one', 1.0), ('0.5', 0.5)):
        assert [scale(n, embed_scale_rule=rule) for n in names] == [factor] * len(names), rule
    # the forward reads it: vanilla at sqrt(2.5 H) is vanilla with its embeddings times sqrt(2.5)
    model, scaled = tiny(), tiny(embed_scale_rule='sqrt2.5H')
    with torch.no_grad():
        scaled.embed_in.weight.copy_(model.embed_in.weight / math.sqrt(2.5))
    idx = tokens((2, 6), 0)
    with torch.no_grad():
        torch.testing.assert_close(scaled(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
    for bad, match in ((dict(embed_scale_rule='sqrt3H'), 'embed_scale_rule must be'),
                       (dict(embed_scale_rule='-1'), 'embed_scale_rule must be'),
                       (dict(embed_scale_rule='one', scale_embeds=False), 'not both'),
                       (dict(init_shrink_passes=-1), 'init_shrink_passes must be >= 0'),
                       (dict(init_shrink_passes=2, weight_init='normal'), "only with weight_init='small'")):
        with pytest.raises(ValueError, match=match):
            GPTConfig(**TINY_MODEL, **bad)


# -----------------------------------------------------------------------------
# the cost

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


@pytest.mark.parametrize('name', ['pause-k1', 'pause-k3', 'loop-k1', 'loop-k3', 'hidden-n1', 'hidden-n3'])
def test_flops_memory_and_cache_follow_the_passes(name):
    count = int(name.split('-')[1][1:])
    slots = count + 1 if name.startswith('pause') else 1  # positions per token the trunk sees
    passes = 1 if name.startswith('pause') else count + 1

    def config(**kw):
        return GPTConfig(**{'block_size': 4, 'vocab_size': 2, 'n_layer': 2, 'n_head': 4, 'n_embd': 256, **kw})

    def method(**kw):
        return config(**method_fields(name), pause_token_id=1, **kw)

    # attention and the vocabulary negligible: the dense work of every slot of every pass
    assert flops_per_token(method()) / flops_per_token(config()) == pytest.approx(slots * passes, rel=0.02)
    # the vocabulary projection once per token: the head term is vanilla's
    head = flops_per_token(method(vocab_size=50000)) - flops_per_token(method())
    assert head == pytest.approx(flops_per_token(config(vocab_size=50000)) - flops_per_token(config()), rel=1e-9)
    # the attention term (what grows with the context): Pause's slots each see a context slots x longer
    attn = flops_per_token(method(), seq_len=64) - flops_per_token(method(), seq_len=32)
    vanilla_attn = flops_per_token(config(), seq_len=64) - flops_per_token(config(), seq_len=32)
    assert attn == pytest.approx(slots * slots * passes * vanilla_attn, rel=1e-9)
    # the memory plan runs, and grows with the count
    bigger = method_fields(name.replace(str(count), str(count + 1)))
    plans = [plan_memory(GPTConfig(**TINY_MODEL, **f, pause_token_id=PAUSE_ID), batch_size=2)
             for f in (method_fields(name), bigger)]
    assert plans[0].total < plans[1].total and name in plans[0].summary()
    # the KV cache: K+1 (N+1) slots per token, and the model's caches are that big
    cfg = GPTConfig(**TINY_MODEL, **method_fields(name), pause_token_id=PAUSE_ID)
    assert kv_cache_slots(cfg) == count + 1
    caches = GPT(cfg).new_caches(2, 10, 'cpu')
    plain = GPT(GPTConfig(**TINY_MODEL)).new_caches(2, 10, 'cpu')
    assert sum(c.k.numel() for c in caches) == (count + 1) * sum(c.k.numel() for c in plain)


@pytest.mark.parametrize('name', ['vanilla', 'ponderlm2-k2', 'ponderlm1-n2', 'pause-k2', 'loop-k1', 'hidden-n2'])
def test_inference_flops_are_what_decoding_one_token_multiplies(name):
    """inference_flops_per_token against torch's FLOP counter around one cached decoding step after t tokens, the
    vocabulary projection included; SDPA's math backend, so that attention is counted as its two matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = GPTConfig(**TINY_MODEL, **method_fields(name), pause_token_id=PAUSE_ID)
    model = GPT(cfg).eval()
    t = 5
    idx = torch.randint(0, V - 1, (1, t + 1))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, caches = prefill(model, idx[:, :t], max_len=t + 1, exact=True)
        with FlopCounterMode(display=False) as counter:
            model.embed_out(model.sequential(idx[:, t:], caches)[0][:, -1])  # one new token, as decoding runs it
    # Pause's K+1 slots go through together, so SDPA also multiplies its later slots' keys that the mask hides
    masked = 4 * cfg.n_layer * cfg.n_embd * cfg.slots * (cfg.slots - 1) // 2 if cfg.n_pause else 0
    assert counter.get_total_flops() == inference_flops_per_token(cfg, position=t) + masked
    # the default is the mean over a block: the FLOPs at the mean position
    assert inference_flops_per_token(cfg) == pytest.approx(inference_flops_per_token(cfg, (cfg.block_size - 1) / 2))
    if name == 'vanilla':  # one trunk pass of one slot and the head: the forward of flops_per_token at t + 1 = T
        short = replace(cfg, block_size=t + 1)
        assert inference_flops_per_token(short, position=t) == flops_per_token(short, training=False)


# -----------------------------------------------------------------------------
# the config

def test_config_checks_and_method_names():
    for a, b in itertools.combinations(METHOD_COUNTS, 2):
        with pytest.raises(ValueError, match='different methods'):
            GPTConfig(**{a: 1, b: 2})
    for bad in (V, 50288, -1):  # no row of a vocabulary of V
        with pytest.raises(ValueError, match='pause_token_id'):
            GPTConfig(**TINY_MODEL, n_pause=1, pause_token_id=bad)
    assert GPTConfig(**TINY_MODEL).method == 'vanilla'  # the default pause_token_id matters to Pause only
    for name in ['vanilla', 'ponderlm2-k1', 'ponderlm1-n3', 'pause-k2', 'loop-k1', 'hidden-n3']:
        fields = method_fields(name)
        assert set(fields) == set(METHOD_COUNTS)
        config = GPTConfig(**fields)
        assert config.method == name and method_fields(config.method) == fields
    assert [GPTConfig(**method_fields(n)).method_label for n in ('pause-k2', 'loop-k1', 'hidden-n3')] == \
        ['Pause K=2', 'Loop K=1', 'Hidden N=3']
    for name in ('pause-k0', 'loop-k', 'hidden-2'):
        with pytest.raises(ValueError, match='method'):
            method_fields(name)
