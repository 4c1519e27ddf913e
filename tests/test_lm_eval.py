"""The lm-eval adapter (nanoponder/lm_eval_adapter.py) and eval.py's downstream mode, offline on the CPU: lm-eval
tasks written here as YAML over local JSON files, lm-eval's own 'hf' model on a tiny random GPT-NeoX (and on a
PonderLM-2 export) as the peer, thought models scored exactly or with Jacobi passes, the baselines in one forward per
batch, generate_until, the table and JSON of --tasks, and the one line of a task whose data is not here.

    python -m pytest tests/test_lm_eval.py -q
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from nanoponder.hf import save_pretrained
from helpers import ENV, ROOT, assert_one_error, randomize, tiny
from test_eval import WORDS, run_eval, run_main


@pytest.fixture(scope='module')
def tokenizer_json(tiny_tokenizer):
    return tiny_tokenizer(WORDS, max_words=10)


# -----------------------------------------------------------------------------
# lm-eval's own hf model as the peer

def lm_tasks(root, hf_model):
    """Three tasks as lm-eval YAML over local JSON lines: multiple choice, LAMBADA-style loglikelihood (some
    targets made greedy under hf_model, so is_greedy is compared on both values), and rolling perplexity."""
    rng = random.Random(0)

    def line(n):
        return ' '.join(rng.choice(WORDS[:10]) for _ in range(n))

    def write(name, docs, spec):
        with open(root / f'{name}.jsonl', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps(d) + '\n' for d in docs)
        (root / f'{name}.yaml').write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n"
            f"  cache_dir: {root / 'cache'}\ntest_split: test\n{spec}", encoding='utf-8')

    write('tiny_mc', [{'question': line(6), 'choices': [line(2), line(1), line(3)], 'label': i % 3} for i in range(8)],
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
          '  - metric: acc_norm\n')
    docs = [{'context': line(8), 'target': ' cat'} for _ in range(6)] + greedy_docs(hf_model, line, 3)
    write('tiny_lambada', docs,
          'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\nmetric_list:\n'
          '  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n  - metric: acc\n')
    write('tiny_rolling', [{'page': '\n'.join(line(12) for _ in range(8))} for _ in range(3)],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\nmetric_list:\n'
          '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n')
    return ['tiny_mc', 'tiny_lambada', 'tiny_rolling']


def greedy_docs(hf_model, line, n):
    """n documents whose target is the model's greedy next token after the context (and tokenizes as that token
    after it), so that is_greedy is true for them."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(hf_model.name_or_path)
    found = []
    for _ in range(100):
        context = line(6)
        ids = tok(context)['input_ids']
        with torch.no_grad():
            best = hf_model(torch.tensor([ids])).logits[0, -1].argmax().item()
        target = tok.decode([best])
        if target.strip() and tok(context + target)['input_ids'] == ids + [best]:
            found.append({'context': context, 'target': target})
        if len(found) == n:
            return found
    raise AssertionError(f"found only {len(found)} contexts whose greedy token is a clean continuation")


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory, tokenizer_json):
    """A tiny random GPT-NeoX saved by transformers, with our tokenizer.json beside it."""
    transformers = pytest.importorskip('transformers')
    path = tmp_path_factory.mktemp('hf')
    cfg = transformers.GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=48, rotary_pct=0.25,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    shutil.copy(tokenizer_json, path / 'tokenizer.json')
    (path / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
        'unk_token': '<|endoftext|>', 'model_max_length': 48}))
    return path


def test_lm_eval_adapter_matches_lm_evals_own_hf_model(tmp_path, hf_dir):
    """The same model and tokenizer through our adapter and through lm-eval's 'hf' model: equal accuracies, and
    every log-likelihood within 1e-4 (the rolling task's documents span several 48-token windows)."""
    lm_eval = pytest.importorskip('lm_eval')
    pytest.importorskip('accelerate')  # lm-eval's hf model needs it
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval()
    names = lm_tasks(tmp_path, hf_model)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours = ev.lm_eval_adapter().NanoPonderLM(init_from=str(hf_dir), batch_size=3)
    peer = HFLM(pretrained=str(hf_dir), device='cpu', batch_size=3)
    results = [lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                       log_samples=True) for lm in (ours, peer)]
    assert_same_results(*results, names)


def assert_same_results(a, b, names):
    """lm-eval results a (ours) and b (the peer's): equal accuracies, every log-likelihood within 1e-4."""
    for name in names:
        for metric, value in b['results'][name].items():
            if isinstance(value, float):
                assert a['results'][name][metric] == pytest.approx(value, rel=1e-4), (name, metric)
        for mine, theirs in zip(a['samples'][name], b['samples'][name], strict=True):
            for x, y in zip(mine['resps'], theirs['resps'], strict=True):
                if isinstance(y[0], tuple):  # (logprob, is_greedy)
                    assert x[0][0] == pytest.approx(y[0][0], abs=1e-4) and x[0][1] == y[0][1]
                else:
                    assert x[0] == pytest.approx(y[0], abs=1e-4)
    assert 0 < a['results']['tiny_lambada']['acc,none'] < 1  # both greedy and non-greedy targets were compared
    assert 0 < a['results']['tiny_mc']['acc,none'] < 1


def test_lm_evals_own_hf_model_scores_a_ponderlm2_export_as_our_adapter(tmp_path, tokenizer_json):
    """A PonderLM-2 K=1 export through lm-eval's stock 'hf' model (trust_remote_code=True: the directory's own
    code, exact thoughts asked through from_pretrained's thoughts=) and through our adapter: the same scores."""
    lm_eval = pytest.importorskip('lm_eval')
    pytest.importorskip('accelerate')
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model = randomize(tiny(vocab_size=300, block_size=48, n_thoughts=1), std=0.3)
    save_pretrained(model, str(tmp_path / 'hf'), tokenizer_json)
    path = str(tmp_path / 'hf')
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, thoughts='exact')
    names = lm_tasks(tmp_path, hf_model.eval())
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    ours = ev.lm_eval_adapter().NanoPonderLM(init_from=path, batch_size=3)  # thoughts='exact', its default
    peer = HFLM(pretrained=path, device='cpu', batch_size=3, trust_remote_code=True, thoughts='exact')
    assert type(peer.model).__name__ == 'NanoPonderForCausalLM'
    results = [lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                       log_samples=True) for lm in (ours, peer)]
    assert_same_results(*results, names)


# -----------------------------------------------------------------------------
# the adapter on its own

def test_eval_needs_lm_eval_only_for_tasks_and_registers_nanoponder():
    r = subprocess.run([sys.executable, '-c', "import sys, eval; assert 'lm_eval' not in sys.modules"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    registry = pytest.importorskip('lm_eval.api.registry')
    cls = ev.lm_eval_adapter().NanoPonderLM  # defines and registers the class
    assert registry.get_model('nanoponder') is cls


def test_tasks_without_lm_eval_are_one_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lm_eval', None)  # import lm_eval now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, 'nanoponder.lm_eval_adapter', raising=False)
    with pytest.raises(ev.UserError, match=r"downstream tasks need lm-evaluation-harness: pip install 'lm-eval"):
        ev.lm_eval_adapter()


def instance(kind, args):
    from lm_eval.api.instance import Instance
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


PAIRS = [('the cat sat on', ' a mat'), ('naïve café', ' 🙂'), ('', 'the dog')]  # (context, continuation)


def reference_logprob(tok, context, continuation, logits_of):
    """The log-probability of continuation after context: one unpadded sequence through logits_of, (B, T) ids ->
    (B, T, V) logits."""
    ctx = tok.encode(context) if context else [tok.eos_id]
    cont = tok.encode(context + continuation)[len(ctx):] if context else tok.encode(continuation)
    idx = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(logits_of(idx[:, :-1])[0].float(), dim=-1)
    return logprobs[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum().item()


def test_lm_eval_adapter_scores_thought_models_exactly_or_with_jacobi(tok):
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    requests = [instance('loglikelihood', p) for p in PAIRS]
    exact = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(requests)
    jacobi = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, thoughts='jacobi', n_jacobi=0).loglikelihood(requests)
    for (context, continuation), (lp_exact, _), (lp_jacobi, _) in zip(PAIRS, exact, jacobi):
        assert lp_exact == pytest.approx(reference_logprob(tok, context, continuation, model.sequential_logits),
                                         abs=1e-4)
        assert lp_jacobi == pytest.approx(
            reference_logprob(tok, context, continuation, lambda x: model(x, n_jacobi=0)[0]), abs=1e-4)
    assert max(abs(e[0] - j[0]) for e, j in zip(exact, jacobi)) > 1e-3  # the two ways differ: both are checked


def test_lm_eval_adapter_honours_adaptive_thoughts_with_exact_thoughts_only(tok):
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    requests = [instance('loglikelihood', p) for p in PAIRS]
    lm = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2, think_threshold=0.0)
    assert lm.scoring() == 'exact (sequential, KV cache), think_threshold 0'
    adaptive = lm.loglikelihood(requests)
    prompt = torch.tensor([tok.encode('the cat')])
    generated = lm.generate_until([instance('generate_until', ('the cat', {'until': ['never seen'],
                                                                          'max_gen_toks': 4}))])
    assert generated[0] == tok.decode(model.generate(prompt, 4, temperature=0)[0, prompt.size(1):].tolist())
    for (context, continuation), (logprob, _) in zip(PAIRS, adaptive):  # the rule as decoding applies it
        assert logprob == pytest.approx(reference_logprob(tok, context, continuation, model.sequential_logits),
                                        abs=1e-4)
    model.think_threshold = 1.0
    always = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(adaptive, always)) > 1e-3  # the threshold changed the scores
    with pytest.raises(ev.UserError, match="Jacobi passes cannot: use thoughts='exact'"):
        ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, thoughts='jacobi', think_threshold=0.5)
    for bad in ('high', 1.5):
        with pytest.raises(ev.UserError, match='think_threshold must be a number in'):
            ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, think_threshold=bad)


@pytest.mark.parametrize('kw', [dict(n_pause=2, pause_token_id=299), dict(n_loop=1), dict(n_hidden=2)])
def test_lm_eval_adapter_scores_a_baseline_in_one_forward_per_batch(tok, kw):
    """No thoughts: the parallel forward is exact, right-padded batches included (Pause's slots after the padding
    come after every slot that is scored)."""
    pytest.importorskip('lm_eval')
    model = randomize(tiny(vocab_size=300, **kw), std=0.3)
    forwards = []
    counted = model.forward
    model.forward = lambda *args, **kwargs: forwards.append(args[0].shape) or counted(*args, **kwargs)
    scores = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2).loglikelihood(
        [instance('loglikelihood', p) for p in PAIRS])
    assert len(forwards) == 2 and forwards[0][0] == 2  # 3 requests: a batch of 2 and one of 1
    for (context, continuation), (logprob, _) in zip(PAIRS, scores):
        assert logprob == pytest.approx(reference_logprob(tok, context, continuation, lambda x: counted(x)[0]),
                                        abs=1e-4)


def test_lm_eval_generate_until_stops_at_strings_and_max_tokens(tok):
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    lm = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2)
    prompt = 'the cat sat on'
    ids = torch.tensor([tok.encode(prompt)])
    greedy = model.generate(ids, 12, temperature=0, n_jacobi=ids.size(1))[0, ids.size(1):].tolist()  # exact prompt
    full = tok.decode(greedy)
    stop = full[3:6]
    assert stop and full.find(stop) >= 3
    got = lm.generate_until([instance('generate_until', (prompt, {'until': [stop], 'max_gen_toks': 12})),
                             instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 5})),
                             instance('generate_until', ('the dog', {'until': ['never seen'], 'max_gen_toks': 5}))])
    assert got[0] == full[:full.find(stop)]
    assert got[1] == tok.decode(greedy[:5])
    dog = torch.tensor([tok.encode('the dog')])
    assert got[2] == tok.decode(model.generate(dog, 5, temperature=0, n_jacobi=dog.size(1))[0, dog.size(1):].tolist())


def test_lm_eval_generate_until_samples_with_the_tasks_settings(tok):
    """do_sample with top_k=1, or a top_p that keeps only the likeliest token, is greedy at any temperature: the
    task's top_k and top_p reach the model's sampler; without do_sample the temperature is ignored."""
    pytest.importorskip('lm_eval')
    model = randomize(tiny(n_thoughts=1, vocab_size=300), std=0.5)
    lm = ev.lm_eval_adapter().NanoPonderLM(model=model, tokenizer=tok, batch_size=2)
    prompt = 'the cat sat on'
    ids = torch.tensor([tok.encode(prompt)])
    greedy = tok.decode(model.generate(ids, 6, temperature=0, exact=True)[0, ids.size(1):].tolist())
    settings = [{'do_sample': True, 'temperature': 5.0, 'top_k': 1}, {'do_sample': True, 'temperature': 5.0,
                'top_p': 1e-6}, {'do_sample': False, 'temperature': 5.0}]
    got = lm.generate_until([instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 6, **s}))
                             for s in settings])
    assert got == [greedy] * 3
    torch.manual_seed(0)
    sampled = lm.generate_until([instance('generate_until', (prompt, {'until': ['never seen'], 'max_gen_toks': 6,
                                                                       'do_sample': True, 'temperature': 5.0}))
                                 for _ in range(4)])
    assert any(text != greedy for text in sampled)  # sampling at a high temperature does leave the greedy path


# -----------------------------------------------------------------------------
# eval.py --tasks

def test_downstream_mode_prints_a_table_and_writes_json(monkeypatch, capsys, tmp_path, hf_dir):
    pytest.importorskip('lm_eval')
    import transformers
    names = lm_tasks(tmp_path, transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval())
    common = dict(init_from=str(hf_dir), task_dir=str(tmp_path), out=str(tmp_path / 'res'), limit=4, device='cpu')
    run_main(monkeypatch, tasks=','.join(names), **common)
    report = json.loads((tmp_path / 'res_tasks.json').read_text())
    assert set(report['results']) == set(names) and report['scoring'] == 'none (no thoughts)'
    assert '|tiny_mc' in capsys.readouterr().out.replace(' ', '')


def test_offline_tasks_are_one_line_naming_what_to_do(hf_dir, tmp_path):
    """A task whose data is on the Hub (arc_easy's own dataset), offline with an empty cache: lm-eval's datasets
    raise ConnectionError. The task is given in --task_dir: indexing lm-eval's thousands of stock tasks costs 7 s
    and reaches the same download."""
    pytest.importorskip('lm_eval')
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'hub_arc.yaml').write_text(
        'task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n'
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: 0\n'
        'doc_to_choice: "{{choices.text}}"\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n')
    env = {**ENV, 'HF_HOME': str(tmp_path / 'hf'), 'HF_DATASETS_CACHE': str(tmp_path / 'hf' / 'datasets')}  # empty
    r = run_eval(f'--init_from={hf_dir}', '--tasks=hub_arc', f'--task_dir={tmp_path / "tasks"}',
                 '--limit=2', f'--out={tmp_path / "x"}', '--device=cpu', env=env)
    assert_one_error(r, 1, 'could not get the data of hub_arc', 'allenai/ai2_arc', 'HF_DATASETS_OFFLINE',
                     '--task_dir')
    assert not os.path.exists(tmp_path / 'x_tasks.json')
