"""
nanoPonder's models inside transformers. nanoponder.hf.save_pretrained copies this file and model.py next to the
weights of every export but vanilla's, and config.json's auto_map names the two classes below, so that the directory
works alone, offline, the way the released PonderLM-2 checkpoint is used:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('hf-shakespeare-ponder', trust_remote_code=True)  # dtype=torch.bfloat16
    tok = AutoTokenizer.from_pretrained('hf-shakespeare-ponder')
    out = model.generate(**tok('ROMEO:', return_tensors='pt'), max_new_tokens=64, do_sample=False)
    model(input_ids, labels=input_ids).loss                    # the loss of nanoPonder's model, Jacobi thoughts
    AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, thoughts='exact')   # or exact thoughts
    AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, think_threshold=0.9)  # adaptive thoughts

The model is model.GPT itself, built from config.json. Without a cache, forward is GPT's: PonderLM-2's thoughts
with num_jacobi_iterations Jacobi passes (the n_jacobi argument overrides it), or one token at a time with
thoughts='exact'. With use_cache=True (what generate does) it is GPT's cached decoding: the prompt as model.prefill
runs it, then every new token exactly, K+1 single-position passes through the KV cache; generate(use_cache=False)
recomputes every step with exact thoughts, as GPT.generate(use_cache=False) does, so greedy generate gives the
tokens of nanoPonder's sample.py (which adds faster kernels of the same math: a near-tie may flip a late token).
Not supported, each with an error: padding (an attention mask with zeros), more than max_position_embeddings
tokens in one sequence, beam search.

This file is imported by transformers from such a directory (model.py beside it), never from the repository.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .model import GPT, GPTConfig

# the official --patch_method that config.json records, and the GPTConfig field that num_latent_thoughts sets for it
COUNT_FIELDS = {'ours': 'n_thoughts', 'pause': 'n_pause', 'loop': 'n_loop', 'ponderlm': 'n_hidden'}


class NanoPonderConfig(PretrainedConfig):
    """config.json of an export: GPT-NeoX's keys and the method's, in the official PonderLM code's spelling, and
    thoughts, how forward computes PonderLM-2's thoughts without a cache: 'jacobi' (num_jacobi_iterations passes,
    as the papers score) or 'exact' (one token at a time, as decoding computes them); think_threshold, the adaptive
    rule of the cached decoding (and of thoughts='exact'; 1 = always think), GPT.think_threshold."""
    model_type = 'nanoponder'

    def __init__(self, thoughts='jacobi', think_threshold=1.0, **kwargs):
        if thoughts not in ('jacobi', 'exact'):
            raise ValueError(f"thoughts must be 'jacobi' or 'exact', got {thoughts!r}")
        if not 0 <= think_threshold <= 1:
            raise ValueError(f"think_threshold must be in [0, 1], got {think_threshold!r}")
        self.thoughts, self.think_threshold = thoughts, think_threshold
        super().__init__(**kwargs)

    def gpt_config(self):
        """The GPTConfig these keys describe (the keys nanoponder.hf.hf_config writes)."""
        counts = dict.fromkeys(COUNT_FIELDS.values(), 0)
        method = getattr(self, 'patch_method', 'ours')
        if method in COUNT_FIELDS:
            counts[COUNT_FIELDS[method]] = self.num_latent_thoughts
        return GPTConfig(
            block_size=self.max_position_embeddings, vocab_size=self.vocab_size, n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads, n_embd=self.hidden_size, n_inner=self.intermediate_size,
            rotary_pct=self.rotary_pct, rotary_base=self.rotary_emb_base,
            parallel_residual=self.use_parallel_residual, layer_norm_eps=self.layer_norm_eps,
            n_jacobi=self.num_jacobi_iterations, **counts,
            n_ponder=self.pondering_steps if self.ponderinglm else 0, ponder_multiply=self.mutiply_pondering_steps,
            scale_embeds=self.scale_embeds,
            **({} if getattr(self, 'pause_token_id', None) is None else {'pause_token_id': self.pause_token_id}))


def adaptive_threshold(config):
    """config.think_threshold (which from_pretrained's keyword sets after __init__), checked."""
    tau = getattr(config, 'think_threshold', 1.0)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        raise ValueError(f"think_threshold must be a number in [0, 1] (1 = always think), got {tau!r}")
    return float(tau)


class ThoughtCache:
    """The KV caches of one generated batch (GPT.new_caches, room for max_position_embeddings tokens and their
    slots), handed from one forward to the next through generate."""

    def __init__(self, caches, slots):
        self.caches, self.slots = caches, slots

    def get_seq_length(self, layer_idx=0):
        """Tokens held (each of PonderLM-2's and Pause's tokens fills K+1 slots)."""
        return self.caches[0].pos // self.slots

    def reorder_cache(self, beam_idx):
        raise ValueError("beam search is not supported by nanoPonder's models; use greedy or sampling (num_beams=1)")


@dataclass
class NanoPonderOutput(ModelOutput):
    loss: torch.Tensor = None
    logits: torch.Tensor = None      # (B, T, V)
    cache: ThoughtCache = None       # with use_cache=True (transformers 5 names it so; 4.x said past_key_values)


class NanoPonderForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoPonderConfig
    base_model_prefix = 'gpt_neox'
    _no_split_modules = ['Block']

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = GPT(config.gpt_config())
        # the head is registered at the top level, where GPT-NeoX files keep it (embed_out.weight), and stays GPT's
        # attribute for GPT's methods (set past nn.Module's registration, which would name it twice)
        head = self.gpt_neox._modules.pop('embed_out')
        self.embed_out = head
        object.__setattr__(self.gpt_neox, 'embed_out', head)
        self.post_init()

    def _init_weights(self, module):
        # GPT initializes its weights itself and a checkpoint replaces them; the rotary tables are buffers that no
        # file holds, computed here again after transformers builds the model on the meta device
        if isinstance(module, GPT):
            module.init_rope()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own cache (ThoughtCache) in forward

    def get_input_embeddings(self):
        return self.gpt_neox.embed_in

    def get_output_embeddings(self):
        return self.embed_out

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, past_key_values=None, use_cache=False,
                n_jacobi=None, return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, V), loss given labels (B, T) (shifted here, -100 ignored), and the
        cache with use_cache=True (or a cache given: then input_ids come after what it holds)."""
        gpt = self.gpt_neox
        gpt.think_threshold = adaptive_threshold(self.config)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported by nanoPonder's models (attention_mask has zeros): "
                             "pass sequences of one length, or one sequence at a time")
        cache = cache if cache is not None else past_key_values
        cache = cache if isinstance(cache, ThoughtCache) else None
        B, T = input_ids.size()
        exact = n_jacobi is None and self.config.thoughts == 'exact'
        if cache is None and not use_cache:
            if gpt.think_threshold < 1 and gpt.config.n_thoughts and not exact:
                raise ValueError("think_threshold < 1 (adaptive thoughts) applies to decoding through the cache and "
                                 "to thoughts='exact'; the parallel Jacobi forward thinks every thought")
            if exact and gpt.config.n_thoughts:
                h, _ = gpt.sequential(input_ids, gpt.new_caches(B, T, input_ids.device))
                logits = self.embed_out(h)
            else:
                logits, _ = gpt(input_ids, n_jacobi=n_jacobi)
        else:
            held = cache.get_seq_length() if cache is not None else 0
            if held + T > gpt.config.block_size:
                raise ValueError(f"{held + T} tokens in one sequence, more than max_position_embeddings "
                                 f"{gpt.config.block_size}: generate fewer new tokens, or shorten the prompt")
            if cache is None:  # the prompt: model.prefill's computation, keeping every position's hidden state
                cache = ThoughtCache(gpt.new_caches(B, gpt.config.block_size, input_ids.device), gpt.config.slots)
                if gpt.config.n_thoughts and not exact and gpt.think_threshold >= 1:
                    h = gpt.think(input_ids, gpt.config.n_jacobi if n_jacobi is None else n_jacobi, cache.caches[0])
                else:
                    h, _ = gpt.sequential(input_ids, cache.caches)
            else:  # tokens after the cache, each thought exact: generate_stream's decoding step
                h, _ = gpt.sequential(input_ids, cache.caches)
            logits = self.embed_out(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return NanoPonderOutput(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, n_jacobi=None, **kwargs):
        """What each step of generate passes to forward: the tokens the cache does not hold yet, or without a cache
        the whole sequence with enough Jacobi passes for every thought to be exact (generate_stream's reference)."""
        cache = cache if cache is not None else past_key_values
        cache = cache if isinstance(cache, ThoughtCache) else None
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        elif not use_cache and self.gpt_neox.config.n_thoughts:
            if adaptive_threshold(self.config) < 1:
                raise ValueError("think_threshold < 1 (adaptive thoughts) decodes through the cache: generate with "
                                 "use_cache=True")
            n_jacobi = self.gpt_neox.exact_passes(input_ids.size(1))
        return dict(input_ids=input_ids, cache=cache, attention_mask=attention_mask, use_cache=use_cache,
                    n_jacobi=n_jacobi)
