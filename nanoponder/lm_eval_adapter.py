"""
A nanoPonder model as an lm-evaluation-harness 0.4 model: NanoPonderLM, registered as lm-eval's model 'nanoponder',
with batched loglikelihood (through TemplateLM's tokenization of context and continuation, as lm-eval's own 'hf'
model), loglikelihood_rolling and generate_until. A PonderLM-2 model scores with exact thoughts (thoughts='exact':
the thoughts that decoding computes) or with Jacobi passes (thoughts='jacobi': n_jacobi parallel passes, or
adaptively to jacobi_tol, as the papers score), and generates with model.generate_stream. With exact thoughts it
honours adaptive thoughts (think_threshold τ < 1, or the model's own): scoring and generating stop a token's thoughts
as decoding does; Jacobi passes have no such rule and refuse τ < 1. run_tasks runs a list of tasks end to end: a
table on stdout and a JSON report.

    import lm_eval
    from nanoponder.lm_eval_adapter import NanoPonderLM
    lm = NanoPonderLM(init_from='out/ckpt.pt')  # or model=GPT, tokenizer=a nanoponder.tokenizer tokenizer
    lm_eval.simple_evaluate(model=lm, tasks=['lambada_openai'])
"""
import json
import sys

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table
from tqdm import tqdm

from model import generate_stream, settled
from nanoponder import kernels
from nanoponder.checkpoint import load_init_from
from nanoponder.methods import check_thought_mode
from nanoponder.runtime import UserError, autocast, failure, one_line, resolve_device, resolve_dtype, write_json
from nanoponder.tokenizer import model_tokenizer



def next_token_logits(model, idx, thoughts='exact', n_jacobi=None, jacobi_tol=None):
    """idx (B, T) -> logits (B, T, V) of every next token. A PonderLM-2 model computes its thoughts exactly
    (thoughts='exact', as decoding does) or with n_jacobi Jacobi passes (None: the model's own), or adaptively until
    a pass moves them by at most jacobi_tol, at most the K(T-1) passes after which all are exact. Other models have
    no thoughts: one forward is exact."""
    if not model.config.n_thoughts:
        return model(idx)[0]
    if thoughts == 'exact':
        return model.sequential_logits(idx)
    if jacobi_tol is not None:
        return model.embed_out(model.think(idx, model.exact_passes(idx.size(1)), stop=settled(jacobi_tol)))
    return model(idx, n_jacobi=n_jacobi)[0]


def sampling(settings):
    """generate's sampling arguments for a request's normalized generation settings: greedy unless the task samples
    (do_sample), then at its temperature (lm-eval's default 0 is greedy) with its top_k and top_p, if it gives them
    (top_k 0 filters nothing, as in Hugging Face's generate)."""
    if not settings.get('do_sample'):
        return dict(temperature=0.0)
    top_k, top_p = settings.get('top_k'), settings.get('top_p')
    return dict(temperature=float(settings.get('temperature', 0.0)), top_k=int(top_k) if top_k else None,
                top_p=None if top_p is None else float(top_p))


@register_model('nanoponder')
class NanoPonderLM(TemplateLM):
    """model and tokenizer (a GPT and its tokenizer), or init_from (and a tokenizer override): any --init_from
    value. batch_size: requests per forward ('auto' is not supported: 8). think_threshold: set on the model (None:
    the model's own)."""

    def __init__(self, model=None, tokenizer=None, init_from=None, thoughts='exact', n_jacobi=None, jacobi_tol=None,
                 batch_size=8, max_gen_toks=256, device='cpu', dtype='float32', think_threshold=None, **unused):
        super().__init__()
        if model is None:  # loaded here as the scripts load it, with their kernels (a model given is used as it is)
            model, ckpt, source = load_init_from(init_from, 'out')
            tokenizer = model_tokenizer(source, ckpt, tokenizer or '', model.config.vocab_size)
            kernels.install(model)
        check_thought_mode(thoughts)
        if think_threshold is not None:  # (set on the model: it stays its decoding rule after the tasks)
            if isinstance(think_threshold, bool) or not isinstance(think_threshold, (int, float)) \
                    or not 0 <= think_threshold <= 1:
                raise UserError(f"think_threshold must be a number in [0, 1] (1 = always think), got "
                                f"{think_threshold!r}")
            model.think_threshold = float(think_threshold)
        if model.think_threshold < 1 and model.config.n_thoughts and thoughts != 'exact':
            raise UserError(f"think_threshold {model.think_threshold:g} stops thoughts token by token, as decoding "
                            f"does; Jacobi passes cannot: use thoughts='exact'")
        self._device = resolve_device(str(device))
        device_type = torch.device(self._device).type
        self.ctx = autocast(device_type, resolve_dtype(dtype, device_type))
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self.thoughts, self.n_jacobi, self.jacobi_tol = thoughts, n_jacobi, jacobi_tol
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    @property
    def max_length(self):
        return self.model.config.block_size

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def tokenizer_name(self):
        return str(self.tok.path or self.tok.name)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def logits(self, idx):
        """idx (B, T) -> (B, T, V) float32 log-probabilities of every next token."""
        with torch.no_grad(), self.ctx:
            logits = next_token_logits(self.model, idx, self.thoughts, self.n_jacobi, self.jacobi_tol)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation) or None, context ids, continuation ids) -> [(logprob, is_greedy)].
        The sequence is cut on the left to max_length + 1 tokens; the logits of its last len(continuation)
        positions score the continuation. Longest first, right-padded batches (causal: padding after a row
        changes nothing before it)."""
        inputs, results = [], [None] * len(requests)
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append((whole[:-1], whole[-len(continuation):]))
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i][0]))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc='loglikelihood', file=sys.stderr)
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            length = len(inputs[rows[0]][0])
            idx = torch.zeros(len(rows), length, dtype=torch.long)  # (B, T), right-padded with id 0
            for j, i in enumerate(rows):
                idx[j, :len(inputs[i][0])] = torch.tensor(inputs[i][0])
            logprobs = self.logits(idx.to(self._device))  # (B, T, V)
            for j, i in enumerate(rows):
                n, target = len(inputs[i][0]), torch.tensor(inputs[i][1], device=self._device)
                lp = logprobs[j, n - len(target):n]  # (len(target), V)
                answer = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial('loglikelihood', requests[i][0], answer)
            bar.update(len(rows))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of whole texts: lm-eval's rolling windows of max_length tokens, each scoring
        tokens no earlier window scored, the first after the EOS token."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled, if a task asks) continuations through the KV cache, until a stop string, the
        EOS token or max_gen_toks. Requests with the same settings and prompt length share a batch."""
        groups = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            settings['until'] = handle_stop_sequences(settings['until'], eos=self.tok.decode([self.eot_token_id]))
            room = self.max_length - settings['max_gen_toks']
            if room < 1:
                raise UserError(f"max_gen_toks={settings['max_gen_toks']} leaves no room for a prompt in the "
                                f"model's context of {self.max_length} tokens")
            ids = (self.tok_encode(context) or [self.eot_token_id])[-room:]
            key = (json.dumps(settings, sort_keys=True, default=str), len(ids))
            groups.setdefault(key, []).append((i, ids, settings))
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc='generate_until', file=sys.stderr)
        for members in groups.values():
            for b in range(0, len(members), self.batch_size):
                batch = members[b:b + self.batch_size]
                texts = self.continue_texts([ids for _, ids, _ in batch], batch[0][2])
                for (i, _, _), text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial('generate_until', requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def continue_texts(self, prompts, settings):
        """Continue B prompts of equal length with model.generate_stream, each until its first stop string or the
        EOS token, at most max_gen_toks tokens; the texts, each cut before its first stop string."""
        until = settings['until']
        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)  # (B, T)
        new, done = [[] for _ in prompts], [False] * len(prompts)
        with self.ctx:
            for idx_next, _ in generate_stream(self.model, idx, settings['max_gen_toks'], **sampling(settings),
                                               **self.prompt_thoughts()):
                for row, token in enumerate(idx_next[:, 0].tolist()):
                    if not done[row]:
                        new[row].append(token)
                        done[row] = token == self.eot_token_id or any(s in self.tok.decode(new[row]) for s in until)
                if all(done):
                    break
        return [postprocess_generated_text(self.tok.decode(ids), until, None) for ids in new]

    def scoring(self):
        """How the model's thoughts are scored, for people."""
        if not self.model.config.n_thoughts:
            return 'none (no thoughts)'
        if self.thoughts == 'exact':
            tau = self.model.think_threshold
            return 'exact (sequential, KV cache)' + (f', think_threshold {tau:g}' if tau < 1 else '')
        if self.jacobi_tol is not None:
            return f'jacobi, adaptive to tol {self.jacobi_tol:g}'
        return f'jacobi, {self.model.config.n_jacobi if self.n_jacobi is None else self.n_jacobi} passes'

    def prompt_thoughts(self):
        """generate's options for the prompt's thoughts, as the scoring computes them: exact, adaptive to jacobi_tol
        (a new settled predicate: it remembers the passes it saw) or n_jacobi passes."""
        if self.thoughts == 'exact':
            return dict(exact=True)
        if self.jacobi_tol is not None:
            return dict(stop=settled(self.jacobi_tol))
        return dict(n_jacobi=self.n_jacobi)


# -----------------------------------------------------------------------------
# a list of tasks end to end

def run_tasks(model, tok, name, path, tasks, num_fewshot=0, limit=0, task_dir='', seed=1337, **options):
    """The tasks (names) through lm-eval with NanoPonderLM(model, tok, **options): a markdown table on stdout and
    PATH_tasks.json. name: the model's, for the report. A task that is unknown, or whose data cannot be fetched,
    is one UserError."""
    lm = NanoPonderLM(model=model, tokenizer=tok, **options)
    manager = task_manager(tasks, task_dir)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit or None,
                                          task_manager=manager, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:  # datasets could not fetch a task's data (offline, or the network is down)
        raise failure(f"could not get the data of {', '.join(tasks)}: {one_line(e)}. lm-eval downloads task "
                      f"datasets from the Hugging Face Hub: run once with network access (they are cached, and "
                      f"offline runs, HF_DATASETS_OFFLINE=1, read the cache), or give tasks over local files in "
                      f"--task_dir") from None
    print(f"{name}, {model.config.method_label}, thoughts: {lm.scoring()}, {num_fewshot}-shot")
    print(make_table(results))
    report = {'model': name, 'method': model.config.method, 'scoring': lm.scoring(),
              'num_fewshot': num_fewshot, 'limit': limit or None, 'results': results.get('results'),
              'versions': results.get('versions'), 'n-shot': results.get('n-shot'),
              'n-samples': results.get('n-samples')}
    write_json(path + '_tasks.json', report)
    print(f"wrote {path}_tasks.json", file=sys.stderr)


def task_manager(tasks, task_dir):
    """lm-eval's index of the tasks: task_dir's alone when it has them all (indexing lm-eval's own thousands of
    task files takes a while), else lm-eval's with task_dir's added. Unknown names are a UserError."""
    if task_dir:
        own = TaskManager(include_path=task_dir, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    manager = TaskManager(include_path=task_dir or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval --tasks list shows them; a folder "
                        f"of your own YAMLs goes in --task_dir)")
    return manager
