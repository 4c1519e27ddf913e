"""
What makes large runs possible, checked on the CPU in-process with tiny models: activation checkpointing changes
no gradient, per-Block compilation matches eager with a number of graphs that does not grow with R, dtype='auto'
picks bf16 only where matmuls run natively in it, and the memory plan (nanoponder.cost) agrees with the measured peak
RSS of small training steps. FSDP and DDP end to end (2 processes, resume across parallelisms): test_train.py.

    python -m pytest tests/test_scale.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoponder import runtime
from nanoponder.cost import count_params, plan_memory
from model import GPT, GPTConfig
from helpers import ENV, METHODS, ROOT, tiny

SHAPE = dict(n_head=2, vocab_size=128, block_size=16)  # the models here, in training mode: tiny(method, **SHAPE).train()
# the papers' baselines next to METHODS, as GPTConfig fields (Pause: its vector the last embedding row)
BASELINES = {'pause-k2': {'n_pause': 2, 'pause_token_id': 127}, 'loop-k2': {'n_loop': 2},
             'hidden-n2': {'n_hidden': 2}}
EVERY_METHOD = {**METHODS, **BASELINES}


def model_of(method):
    """tiny() of any method of EVERY_METHOD, in training mode."""
    return tiny('vanilla', **EVERY_METHOD[method], **SHAPE).train()


def batch(B=2, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (B, T), generator=g), torch.randint(0, 128, (B, T), generator=g)


def loss_and_grads(model, x, y, R=2):
    model.zero_grad(set_to_none=True)
    loss = model(x, y, n_jacobi=R)[1]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def block_calls(model):
    """A counter of Block calls (a recomputation in backward calls it again, and stops as soon as it has what
    backward needs: a forward pre-hook sees it, a forward hook would not)."""
    calls = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


# -----------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize('method', list(EVERY_METHOD))
def test_activation_checkpointing_gives_the_same_gradients(method):
    x, y = batch()
    model = model_of(method)
    calls = block_calls(model)
    loss, grads = loss_and_grads(model, x, y)
    plain_calls = len(calls)
    model.activation_checkpointing = True
    calls.clear()
    loss_ac, grads_ac = loss_and_grads(model, x, y)
    assert len(calls) == 2 * plain_calls  # every Block call of every pass is recomputed once in backward
    assert torch.equal(loss, loss_ac)
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=1e-7, msg=name)
    # without a backward (evaluation, decoding) nothing is checkpointed
    calls.clear()
    with torch.no_grad():
        model(x, y)
        model.generate(x[:1, :4], 3, temperature=0)
    model.activation_checkpointing = False
    n_checkpointed = len(calls)
    calls.clear()
    with torch.no_grad():
        model(x, y)
        model.generate(x[:1, :4], 3, temperature=0)
    assert n_checkpointed == len(calls)


def test_activation_checkpointing_is_not_part_of_the_model():
    """A setting of the run, not of the model: nothing of it is in the config or the state dict, so a run may
    resume with it switched on or off."""
    model = tiny('ponderlm2-k1', **SHAPE).train()
    keys = set(model.state_dict())
    model.activation_checkpointing = True
    assert set(model.state_dict()) == keys and 'activation_checkpointing' not in vars(model.config)
    assert GPT(model.config).activation_checkpointing is False


# -----------------------------------------------------------------------------
# per-Block compilation

def test_compiled_blocks_match_eager_and_the_graphs_do_not_grow_with_R():
    """compile_blocks compiles each Block's call; every pass of the thought loop reuses those graphs, so
    R = 2, 3, 4 need no new ones (torch.compile of the whole model unrolls the loop: a graph per R, 16-39 s
    each for this toy on this CPU with inductor). The backend here is aot_eager: Dynamo's capture and
    AOTAutograd's forward/backward split, the parts that our code can break, without inductor's C++ builds
    (about a minute on 2 cores; checked by hand: the same graph counts, gradients within 5e-8)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    x, y = batch()
    eager, compiled = tiny('ponderlm2-k1', **SHAPE).train(), tiny('ponderlm2-k1', **SHAPE).train()
    runtime.compile_blocks(compiled, backend='aot_eager')
    graphs = []
    for R in (2, 3, 4):
        loss, grads = loss_and_grads(eager, x, y, R)
        loss_c, grads_c = loss_and_grads(compiled, x, y, R)
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=1e-5, msg=name)
        graphs.append(counters['stats']['unique_graphs'])
    assert graphs[0] == graphs[1] == graphs[2] > 0, graphs
    # with activation checkpointing too (the recomputation reruns the compiled Block)
    compiled.activation_checkpointing = True
    loss_c, grads_c = loss_and_grads(compiled, x, y, 3)
    loss, grads = loss_and_grads(eager, x, y, 3)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=1e-5, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no '_orig_mod.' in checkpoints
    # truncated backpropagation (jacobi_grad_passes): grad mode is in Dynamo's guards, so the passes without a graph
    # add a graph per shape, once; the count stays under the recompile limit (beyond it a Block would run eager)
    compiled.activation_checkpointing = False
    before = counters['stats']['unique_graphs']
    for G in (1, 2):
        compiled.jacobi_grad_passes = eager.jacobi_grad_passes = G
        for R in (2, 3, 1):  # R = 1 < G = 2: every pass over all slots with a graph, the stage without
            loss_c, grads_c = loss_and_grads(compiled, x, y, R)
            loss, grads = loss_and_grads(eager, x, y, R)
            torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
            for name in grads:
                torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=1e-5, msg=name)
    after = counters['stats']['unique_graphs']
    assert after - before <= 2 and after <= torch._dynamo.config.recompile_limit, (before, after)
    assert not counters['unimplemented'], dict(counters['unimplemented'])
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# dtype='auto'

def test_auto_dtype_is_bf16_only_where_matmuls_are_native(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda v=amx: v)
        assert runtime.resolve_dtype('auto', 'cpu') == expected
        assert runtime.resolve_dtype('float32', 'cpu') == torch.float32  # an explicit choice always wins
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert runtime.resolve_dtype('auto', 'cuda') == torch.float32
    assert runtime.resolve_dtype('auto', 'mps') == torch.float32


def test_explicit_bf16_on_a_cpu_that_emulates_it_is_said_on_stderr(monkeypatch, capsys):
    """bf16 matmuls without AVX512-BF16 or AMX run one to two orders of magnitude slower than fp32 (measured on an
    AVX2 EPYC: ~1 against ~120 GFLOP/s), so an explicit dtype=bfloat16 there gets a note, on stderr: stdout may be
    a script's result."""
    for native, said in ((False, True), (True, False)):
        monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda v=native: v)
        with runtime.autocast('cpu', torch.bfloat16):
            assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        out = capsys.readouterr()
        assert out.out == '' and ('no native bf16 matmul' in out.err) == said
    runtime.autocast('cpu', torch.float32)
    assert capsys.readouterr().err == ''


# -----------------------------------------------------------------------------
# the memory plan

def test_parameter_count_from_the_config():
    for method in EVERY_METHOD:
        model = model_of(method)
        n = count_params(model.config)
        assert n['total'] == model.get_num_params(non_embedding=False)
        assert n['block'] == sum(p.numel() for p in model.layers[0].parameters())
        assert n['matmul'] == sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)  # FLOPs' count
    for name in ('pythia-70m', 'pythia-1.4b'):
        config = GPTConfig.preset(name)
        with torch.device('meta'):
            assert count_params(config)['total'] == GPT(config).get_num_params(non_embedding=False)


def test_memory_plan_shards_under_fsdp_and_checkpointing_shrinks_activations():
    config = GPTConfig.preset('pythia-1.4b', n_thoughts=1)
    ddp = plan_memory(config, 1, dtype=torch.bfloat16, parallelism='ddp', world_size=16, grad_accum=8)
    fsdp = plan_memory(config, 1, dtype=torch.bfloat16, parallelism='fsdp', world_size=16, grad_accum=8,
                       gather_dtype=torch.bfloat16)
    fsdp_ac = plan_memory(config, 1, dtype=torch.bfloat16, parallelism='fsdp', world_size=16, grad_accum=8,
                          gather_dtype=torch.bfloat16, activation_checkpointing=True)
    P = count_params(config)['total']
    assert ddp.optimizer == 8 * P and fsdp.optimizer == 8 * P / 16
    assert fsdp.weights < ddp.weights / 4 and fsdp.activations == ddp.activations
    assert fsdp_ac.activations < fsdp.activations / 5
    assert fsdp_ac.total < 20e9 < 50e9 < ddp.total  # the budget: 1.4B does not fit well under ddp
    # R: the plan is for the largest R of training; more thoughts, more slots
    assert plan_memory(GPTConfig.preset('pythia-70m', n_thoughts=2), 1).activations > \
        plan_memory(GPTConfig.preset('pythia-70m', n_thoughts=1), 1).activations
    assert 'fsdp x 16' in fsdp_ac.summary() and 'activation checkpointing' in fsdp_ac.summary()


MEASURE = r'''
import json, sys, torch
from model import GPTConfig
from nanoponder.cost import measure_training_peak, plan_memory
out = []
for method, kw, batch_size, dtype, checkpointing, n_embd, grad_passes in json.loads(sys.argv[1]):
    config = GPTConfig(n_layer=2, n_head=4, n_embd=n_embd, vocab_size=512, block_size=128, **kw)
    dtype = getattr(torch, dtype)
    measured = measure_training_peak(config, batch_size, dtype=dtype, activation_checkpointing=checkpointing,
                                     grad_passes=grad_passes)
    plan = plan_memory(config, batch_size, dtype=dtype, activation_checkpointing=checkpointing, device_type='cpu',
                       grad_passes=grad_passes)
    out.append([f'{method} G={grad_passes}', str(dtype), checkpointing, measured, plan.total])
print(json.dumps(out))
'''


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc to read the peak RSS')
def test_memory_plan_matches_the_measured_peak_rss():
    """Within 15% above and 20% below: the plan counts the tensors that eager autograd keeps, and leaves out what
    is no tensor of ours (LayerNorm statistics, oneDNN's buffers for bf16 matmuls, page granularity); on this
    machine the measured/plan ratios are 0.85-1.11, the plan erring high for the multi-pass baselines. The runs are a fresh process whose malloc returns large freed blocks at
    once (MALLOC_MMAP_THRESHOLD_), so that the peak RSS is the peak of live memory."""
    cases = [(method, kw, 4, 'float32', False, 128, 0) for method, kw in EVERY_METHOD.items()]
    cases += [('ponderlm2-k1', METHODS['ponderlm2-k1'], 4, 'float32', True, 128, 0),
              ('ponderlm2-k1', METHODS['ponderlm2-k1'], 4, 'bfloat16', False, 256, 0)]
    cases += [('ponderlm2-k1', METHODS['ponderlm2-k1'], 4, 'float32', False, 128, G) for G in (1, 2)]
    env = {**ENV, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    r = subprocess.run([sys.executable, '-c', MEASURE, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for method, dtype, checkpointing, measured, planned in json.loads(r.stdout):
        assert planned > 15e6  # big enough that the process's own noise (a few MB) does not matter
        assert 0.8 < measured / planned < 1.15, (method, dtype, checkpointing, measured / 1e6, planned / 1e6)


# -----------------------------------------------------------------------------
# the measured matmul peak that MFU is against on a CPU

def test_matmul_peak_is_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    from nanoponder import cost
    measured = []

    def fake_measure(device, dtype, seconds=1.0):
        measured.append(dtype)
        return 1e11 if dtype == torch.float32 else 3e11
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(cost, 'measure_matmul_peak', fake_measure)
    assert cost.matmul_peak('cpu', torch.float32) == 1e11
    assert cost.matmul_peak('cpu', torch.float32) == 1e11 and measured == [torch.float32]  # from the cache
    assert cost.mfu_peak('cpu', torch.bfloat16) == 3e11 and measured == [torch.float32, torch.bfloat16]
    with open(tmp_path / 'nanoponder' / 'matmul_peak.json') as f:
        keys = list(json.load(f))
    assert len(keys) == 2 and all('cpu' in k and f'{torch.get_num_threads()} threads' in k for k in keys)
    # a cache that cannot be written (here: its directory is a file) is skipped, the figure still comes back
    blocked = tmp_path / 'file'
    blocked.write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(blocked))
    assert cost.matmul_peak('cpu', torch.float32) == 1e11 and len(measured) == 3


def test_measured_matmul_peak_is_a_real_rate():
    from nanoponder import cost
    peak = cost.measure_matmul_peak('cpu', torch.float32, seconds=0.05)
    assert 1e8 < peak < 1e14  # a 2048^3 product: from a slow core to far beyond any CPU
    # the step's FLOPs against it give an MFU below 1 for a real step time
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=128, block_size=32)
    assert cost.estimate_mfu(config, 1000.0, peak_flops=peak) < 1
