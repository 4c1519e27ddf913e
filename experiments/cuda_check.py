"""
The GPU check, prepared to run in one go on one CUDA GPU (about 10 minutes on an H100/H200-class one, by estimate:
it has not run on a GPU yet):
1. the loss and the gradients of one batch on CUDA against the CPU's, from the same weights: in fp32 (TF32 off, so
   only the order of the sums differs) and under bf16 autocast (how training runs); and the loss with truncated
   backpropagation (jacobi_grad_passes=1) against the full one on CUDA in fp32: the same forward;
2. bench.py on CUDA for each model at block_size 2048: vanilla and PonderLM-2 K=1 under bf16, the training step
   eager and with compiled Blocks, MFU against the GPU's datasheet peak, and the memory plan next to the measured
   peak;
3. adaptive thoughts (think_threshold) decoding on CUDA, fp32: the skip decisions of a batch against the CPU's and
   against each row decoded alone (the flip rate), and decoding tokens/s at batch 1 and 8 with every thought and
   with the rule (on CUDA every row runs, the skipping rows' results discarded).
It ends with one summary table; every figure is kept in out_dir (loss.json, adaptive.json, bench-<model>.json and
.md).

    python experiments/cuda_check.py                                # the whole check, into out/cuda_check
    python experiments/cuda_check.py --out_dir=$OUT --models=pythia-70m
    python experiments/cuda_check.py --device=cpu --models=pythia-14m --block_size=64 --batch_size=2 \
        --loss_seq_len=64 --bench_args='--compare_compile=False --new_tokens=8 --new_tokens_uncached=4'  # plumbing

Exit status 1 when a loss or a gradient is off by more than its tolerance, or a bench.py run failed.
"""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)  # run as a script, this file's folder is on the path, not the repository's modules
from model import GPT, GPTConfig  # noqa: E402
from nanoponder import kernels  # noqa: E402
from nanoponder.adaptive import decode_at_batch_one, skip_decisions, timed_decoding  # noqa: E402
from nanoponder.methods import method_fields  # noqa: E402
from nanoponder.runtime import (UserError, check_output_dir, check_seed, failure, resolve_device, run_cli,  # noqa: E402
                                write_json, write_result)

# -----------------------------------------------------------------------------
models = 'pythia-70m,pythia-160m'  # comma-separated Pythia presets, each benchmarked
methods = 'vanilla,ponderlm2-k1'  # what bench.py measures (model.py's names)
block_size = 2048  # training sequence length of the benchmark
batch_size = 8  # training sequences per step of the benchmark
device = 'cuda'  # the device checked against the CPU ('cpu' runs the plumbing alone)
loss_model = 'pythia-70m'  # the preset of the loss check, PonderLM-2 K=1 with R = 3
loss_seq_len = 2048  # tokens of the loss check's one sequence
fp32_tolerance = 1e-4  # largest relative difference of the loss, and relative error of a gradient, in fp32
bf16_tolerance = 5e-2  # the same under bf16 autocast, against the CPU's fp32
adaptive_tokens = 64  # tokens per row of the adaptive decoding check (8 rows)
bench_args = ''  # more bench.py overrides, space-separated (shell quoting)
out_dir = os.path.join(ROOT, 'out', 'cuda_check')
seed = 1337
# -----------------------------------------------------------------------------


def loss_and_grads(gpt, idx, targets, dev, dtype, grad_passes=0):
    """The loss of one batch on dev under dtype autocast and every parameter's gradient (name -> fp32 CPU tensor),
    from a copy of gpt's weights there (gpt itself stays on the CPU); grad_passes: the model's jacobi_grad_passes."""
    model = kernels.install(GPT(gpt.config).to(dev))  # as training runs it
    model.load_state_dict(gpt.state_dict())
    model.jacobi_grad_passes = grad_passes
    # torch.autocast itself, not runtime.autocast, which also turns TF32 on for CUDA (check_loss decides that)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx.to(dev), targets.to(dev))
    loss.backward()
    return loss.item(), {name: p.grad.float().cpu() for name, p in model.named_parameters()}


def compare(reference, other, tolerance):
    """How far other's (loss, gradients) is from the reference's: the loss's relative difference and the largest
    relative error |g - g_ref| / |g_ref| (2-norms) of a parameter's gradient, which parameter that is, and whether
    both are within tolerance."""
    (loss_ref, grads_ref), (loss, grads) = reference, other
    errors = {name: ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item() for name, g in grads_ref.items()}
    worst = max(errors, key=errors.get)
    d_loss = abs(loss - loss_ref) / abs(loss_ref)
    return {'loss': loss, 'loss_rel_diff': d_loss, 'grad_rel_error': errors[worst], 'worst_grad': worst,
            'ok': d_loss <= tolerance and errors[worst] <= tolerance}


def check_loss(dev):
    """Part 1: one sequence of random tokens through PonderLM-2 K=1 (loss_model) on the CPU in fp32, then on dev in
    fp32 with TF32 off and under bf16 autocast. Returns the figures as a dict."""
    config = GPTConfig.preset(loss_model, block_size=loss_seq_len, **method_fields('ponderlm2-k1'))
    torch.manual_seed(seed)
    gpt = GPT(config)
    idx = torch.randint(0, config.vocab_size, (1, loss_seq_len))
    targets = torch.randint(0, config.vocab_size, (1, loss_seq_len))
    t0 = time.perf_counter()
    reference = loss_and_grads(gpt, idx, targets, torch.device('cpu'), torch.float32)
    print(f"cpu fp32: loss {reference[0]:.6f} ({time.perf_counter() - t0:.1f} s)")
    out = {'model': loss_model, 'method': 'ponderlm2-k1', 'seq_len': loss_seq_len, 'cpu_loss': reference[0]}
    for name, dtype, tolerance in (('fp32', torch.float32, fp32_tolerance), ('bf16', torch.bfloat16, bf16_tolerance)):
        if dev.type == 'cuda':  # training allows TF32 for what autocast leaves in fp32; the fp32 check is plain fp32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == 'bf16'
        r = out[name] = compare(reference, loss_and_grads(gpt, idx, targets, dev, dtype), tolerance)
        r['tolerance'] = tolerance
        print(f"{dev.type} {name}: loss {r['loss']:.6f}, relative difference {r['loss_rel_diff']:.2e}; gradients' "
              f"relative error up to {r['grad_rel_error']:.2e} ({r['worst_grad']}): {'ok' if r['ok'] else 'OFF'} "
              f"(tolerance {tolerance:g})")
    # truncated backpropagation changes the gradient, never the forward: its loss against full backprop's, on dev
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    full = loss_and_grads(gpt, idx, targets, dev, torch.float32)[0]
    truncated = loss_and_grads(gpt, idx, targets, dev, torch.float32, grad_passes=1)[0]
    d = abs(truncated - full) / abs(full)
    out['truncated'] = {'loss': truncated, 'full_loss': full, 'loss_rel_diff': d, 'ok': d <= fp32_tolerance}
    print(f"{dev.type} fp32, jacobi_grad_passes=1: loss {truncated:.6f} against {full:.6f} with full backprop, "
          f"relative difference {d:.2e}: {'ok' if d <= fp32_tolerance else 'OFF'}")
    return out


def decode_speed(model, x):
    """Tokens per second of decoding x (B, T) token by token through a KV cache, as sample.py does (after a
    warm-up: first calls allocate)."""
    model.sequential(x[:, :4], model.new_caches(x.size(0), 4, x.device))
    return x.numel() / timed_decoding(model, x)[0]


@torch.no_grad()
def check_adaptive(dev, rows=8):
    """Part 3: PonderLM-2 K=1 (loss_model, random weights) decoding adaptive_tokens tokens of `rows` rows with
    think_threshold at the median of the first readouts' top probabilities (about half the thoughts skipped, many
    decisions near the threshold: a hard case for rounding), fp32 with TF32 off. Returns the figures."""
    config = GPTConfig.preset(loss_model, block_size=max(adaptive_tokens, 8), **method_fields('ponderlm2-k1'))
    torch.manual_seed(seed)
    gpt = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (rows, adaptive_tokens))
    first = gpt.embed_out(gpt.sequential(idx, gpt.new_caches(rows, adaptive_tokens, 'cpu'))[1][:, :, 0])
    tau = first.float().softmax(dim=-1).amax(dim=-1).median().item()
    gpt.think_threshold = tau
    cpu_cache = gpt.new_caches(rows, adaptive_tokens, 'cpu')[0]
    gpt.sequential(idx, [cpu_cache])
    model = kernels.install(GPT(config).to(dev)).eval()
    model.load_state_dict(gpt.state_dict())
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = idx.to(dev)
    model.think_threshold = tau
    cache = model.new_caches(rows, adaptive_tokens, dev)[0]
    model.sequential(x, [cache])
    batched = skip_decisions(cache, adaptive_tokens, config.slots).cpu()
    out = {'model': loss_model, 'threshold': tau, 'rows': rows, 'tokens': adaptive_tokens,
           'skipped': batched.float().mean().item(),
           'flips_vs_cpu': (batched != skip_decisions(cpu_cache, adaptive_tokens, config.slots)).float().mean().item()}
    speed_one, out['flips_batch_1'] = decode_at_batch_one(model, x, batched.to(dev))
    out['tokens_per_s'] = {'batch 1, the rule': speed_one, f'batch {rows}, the rule': decode_speed(model, x)}
    model.think_threshold = 1.0
    out['tokens_per_s'][f'batch {rows}, every thought'] = decode_speed(model, x)
    out['tokens_per_s']['batch 1, every thought'] = decode_at_batch_one(model, x, torch.zeros_like(batched).to(dev))[0]
    print(f"{dev.type} adaptive decoding at threshold {tau:.3g}: {out['skipped']:.1%} of thoughts skipped; decisions "
          f"flipped against the cpu's {out['flips_vs_cpu']:.2%}, batch 1 against batch {rows} "
          f"{out['flips_batch_1']:.2%}; tokens/s " + ', '.join(f"{k} {v:,.0f}" for k, v in out['tokens_per_s'].items()))
    return out


def run_bench(model_name):
    """Part 2: bench.py for one preset on the device. Returns its JSON (None when it wrote none) and whether every
    measurement in it succeeded."""
    json_path = os.path.join(out_dir, f'bench-{model_name}.json')
    has_hf = importlib.util.find_spec('transformers') is not None  # the test-only peer, often absent on a GPU box
    cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bench.py'), f'--model={model_name}', f'--device={device}',
           '--dtype=bfloat16', f'--block_size={block_size}', f'--batch_size={batch_size}', f'--methods={methods}',
           '--compare_compile=True', '--compare_checkpointing=False', '--check_memory=True',
           f'--compare_hf={has_hf}', f'--json={json_path}', *shlex.split(bench_args)]
    print('$ ' + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, f'bench-{model_name}.md'), 'w') as f:
        rc = subprocess.run(cmd, stdout=f, cwd=ROOT).returncode
    print(f"  {time.perf_counter() - t0:.0f} s, exit status {rc}", flush=True)
    if not os.path.exists(json_path):
        return None, False
    with open(json_path) as f:
        return json.load(f), rc == 0


def mib(x):
    return 'n/a' if x is None else f"{x:,.0f}"


def share(x):
    return 'n/a' if x is None else f"{x:.1%}"


def summary(loss, benches, adaptive=None):
    """The loss check in two lines, then one row per model and method: eager tokens/s, MFU and share of the measured
    matmul peak, compiled tokens/s, the measured peak memory and the plan's."""
    lines = [f"loss of one {loss['seq_len']}-token sequence, {loss['model']} {loss['method']}: cpu fp32 "
             f"{loss['cpu_loss']:.6f}"]
    for name in ('fp32', 'bf16'):
        r = loss[name]
        lines.append(f"- {name}: {r['loss']:.6f}, relative difference {r['loss_rel_diff']:.1e}, gradients' relative "
                     f"error up to {r['grad_rel_error']:.1e}: {'ok' if r['ok'] else 'OFF'} (tolerance {r['tolerance']:g})")
    r = loss['truncated']
    lines.append(f"- fp32, jacobi_grad_passes=1 against full backprop: relative difference {r['loss_rel_diff']:.1e}: "
                 f"{'ok' if r['ok'] else 'OFF'}")
    if adaptive:
        a = adaptive
        lines.append(f"- adaptive decoding (fp32, threshold {a['threshold']:.3g}, {a['skipped']:.1%} skipped): "
                     f"decisions flipped against the cpu's {a['flips_vs_cpu']:.2%}, batch 1 against batch "
                     f"{a['rows']} {a['flips_batch_1']:.2%}; tokens/s "
                     + ', '.join(f"{k} {v:,.0f}" for k, v in a['tokens_per_s'].items()))
    lines += ['', '| model | method | tokens/s | MFU | of matmul peak | compiled tokens/s | compile speedup | '
              'peak MiB | plan MiB |', '|---|---|---|---|---|---|---|---|---|']
    for model_name, bench in benches.items():
        if bench is None:
            lines.append(f'| {model_name} | bench.py failed: see bench-{model_name}.md | | | | | | | |')
            continue
        for method, entry in bench['methods'].items():
            if 'train' not in entry:
                lines.append(f"| {model_name} | {method}: {entry.get('error', 'no figures')} | | | | | | | |")
                continue
            t, c = entry['train'], entry.get('compile', {})
            plain = entry.get('memory', {}).get('plain', {})
            compiled = 'n/a' if 'tokens_per_s' not in c else f"{c['tokens_per_s']['median']:,.0f}"
            speedup = 'n/a' if c.get('speedup') is None else f"{c['speedup']:.2f}x"
            lines.append(f"| {model_name} | {method} | {t['tokens_per_s']['median']:,.0f} | {share(t['mfu'])} | "
                         f"{share(t['matmul_peak_share'])} | {compiled} | {speedup} | "
                         f"{mib(plain.get('measured_mib'))} | {mib(plain.get('plan_mib'))} |")
    return '\n'.join(lines)


def check_config():
    """Every mistake in the settings, as one UserError before any work. Returns the model names."""
    names = [m.strip() for m in models.split(',') if m.strip()]
    if not names:
        raise UserError("models is empty; e.g. --models=pythia-70m,pythia-160m")
    for name in names + [loss_model]:
        try:
            GPTConfig.preset(name)
        except ValueError as e:
            raise UserError(str(e)) from None
    for name in methods.split(','):
        try:
            method_fields(name.strip())
        except ValueError as e:
            raise UserError(str(e)) from None
    for key in ('block_size', 'batch_size', 'loss_seq_len', 'adaptive_tokens'):
        if globals()[key] < 1:
            raise UserError(f"{key} must be >= 1, got {globals()[key]}")
    for key in ('fp32_tolerance', 'bf16_tolerance'):
        if not globals()[key] > 0:
            raise UserError(f"{key} must be > 0, got {globals()[key]}")
    try:
        shlex.split(bench_args)
    except ValueError as e:
        raise UserError(f"bench_args: {e}; quote as a shell would, e.g. --bench_args='--repeats=3'") from None
    check_seed(seed)
    check_output_dir(out_dir, '--out_dir')
    return names


def main():
    names = check_config()
    dev = torch.device(resolve_device(device))  # a missing GPU is an error here, before the CPU's minute of work
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    loss = check_loss(dev)
    write_json(os.path.join(out_dir, 'loss.json'), loss)
    adaptive = check_adaptive(dev)
    write_json(os.path.join(out_dir, 'adaptive.json'), adaptive)
    runs = {name: run_bench(name) for name in names}
    table = summary(loss, {name: bench for name, (bench, _) in runs.items()}, adaptive)
    with write_result(os.path.join(out_dir, 'summary.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f"{time.perf_counter() - t0:.0f} s in all; figures in {out_dir}")
    bad = [k for k in ('fp32', 'bf16', 'truncated') if not loss[k]['ok']] + [n for n, (_, ok) in runs.items() if not ok]
    if bad:
        raise failure(f"off or failed: {', '.join(bad)} (see {out_dir})")


if __name__ == '__main__':
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    run_cli(main)
