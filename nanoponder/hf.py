"""
Hugging Face interop: GPT-NeoX config.json keys (with the official PonderLM-2 / PonderingLM method keys) to and from
GPTConfig, the Hub download, and reading and writing model directories (safetensors, PyTorch pickles, shards).

    from nanoponder.hf import load_pretrained, save_pretrained
    model = load_pretrained('EleutherAI/pythia-70m')          # or a local directory
    save_pretrained(model, 'export/my-model', tokenizer_path='data/shakespeare-bpe512/tokenizer.json')
"""
import inspect
import json
import os
import sys
from dataclasses import fields, replace

import torch

from model import GPT, METHOD_COUNTS, GPTConfig
from nanoponder.runtime import move_into_place, remove_stale_temp_files, temp_file, temp_path, write_json


def load_pretrained(name_or_dir, patch_method=None, **overrides):
    """A GPT-NeoX / Pythia / PonderLM checkpoint in Hugging Face format: a local directory with config.json and
    model.safetensors / pytorch_model.bin (or a sharded index), or a hub id. overrides replace GPTConfig fields
    (e.g. n_jacobi=5). patch_method: which official modeling file the checkpoint was trained with (see
    config_from_hf), for a config.json that does not say. The model is fp32 on the CPU."""
    path = name_or_dir if os.path.isdir(name_or_dir) else download_from_hub(name_or_dir)
    config = replace(config_from_hf(read_config(path), patch_method), **checked_overrides(overrides))
    model = empty_model(config)
    load_hf_weights(model, read_state_dict(path))
    return model


def read_config(path):
    """config.json of a model directory, as a dict."""
    config_file = os.path.join(path, 'config.json')
    try:
        with open(config_file, encoding='utf-8') as f:
            return json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{config_file} is not JSON ({e})") from None


def checked_overrides(overrides):
    known = [f.name for f in fields(GPTConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; known: {known}")
    return overrides


def empty_model(config):
    """A model on the CPU with uninitialized weights, for loading: no time spent on a random init."""
    with torch.device('meta'):
        model = GPT(config)
    model.to_empty(device='cpu')
    model.init_rope()  # the rotary tables are non-persistent buffers, in no checkpoint
    return model


def save_pretrained(model, directory, tokenizer_path=None, eos_token='<|endoftext|>', jacobi_train_range=None):
    """Write a Hugging Face directory that load_pretrained reads back: config.json (hf_config: the method's keys in
    the official spelling, and jacobi_train_range, the training run's R range, if given), model.safetensors (fp32,
    Hugging Face names) and, given tokenizer_path, its tokenizer.json with a tokenizer_config.json.
    A vanilla model is a stock GPT-NeoX: its embedding scale is folded into embed_in (and scale_embeds written
    false), so stock transformers computes the same logits; a factor other than the method's official one
    (embed_scale_rule) is folded in too, so the official code reads it right. Every other method also gets its code, so that
    transformers runs it as itself with trust_remote_code=True: modeling_nanoponder.py and model.py copied beside
    the weights, and config.json's model_type 'nanoponder' with an auto_map naming the classes (REMOTE_CODE); a
    model type transformers does not know makes it refuse to load the directory without trust_remote_code, rather
    than build a plain GPT-NeoX. The directory holds a whole model or none, also when the writing is killed: every
    file goes to a temp file first, then the old config.json goes (a directory without one is no model), the
    files are renamed into place, and config.json comes last. Files of the user's own in the directory stay."""
    from safetensors.torch import save as safetensors_bytes
    config, eos_id = model.config, 0
    if tokenizer_path is not None:
        from tokenizers import Tokenizer
        eos_id = Tokenizer.from_file(tokenizer_path).token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {tokenizer_path} has no {eos_token} token")
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    official = replace(config, embed_scale_rule='official', init_shrink_passes=0)  # what the official code reads
    if config.embed_scale_rule != 'official':  # another factor than the official one: folded into the weights
        sd['embed_in.weight'] = sd['embed_in.weight'] * (config.embed_scale / official.embed_scale)
    config = official
    if config.method == 'vanilla' and config.scale_embeds:
        sd['embed_in.weight'] = sd['embed_in.weight'] * config.embed_scale
        config = replace(config, scale_embeds=False)
    sd = {(k if k == 'embed_out.weight' else 'gpt_neox.' + k): v for k, v in sd.items()}
    files = {'model.safetensors': safetensors_bytes(sd, metadata={'format': 'pt'})}  # name -> its bytes
    hf = hf_config(config, eos_id, jacobi_train_range)
    if config.method != 'vanilla':
        for name, source in REMOTE_CODE.items():
            with open(source, 'rb') as src:
                files[name] = src.read()
        hf.update(model_type='nanoponder', architectures=['NanoPonderForCausalLM'], thoughts='jacobi',
                  auto_map={'AutoConfig': 'modeling_nanoponder.NanoPonderConfig',
                            'AutoModelForCausalLM': 'modeling_nanoponder.NanoPonderForCausalLM'})
    if tokenizer_path is not None:
        with open(tokenizer_path, 'rb') as src:
            files['tokenizer.json'] = src.read()
        files['tokenizer_config.json'] = json.dumps({
            'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': eos_token, 'eos_token': eos_token,
            'unk_token': eos_token, 'model_max_length': config.block_size}, indent=2).encode() + b'\n'
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory, ['config.json', *files])  # of an export that was killed
    paths = [os.path.join(directory, name) for name in files]
    old_config = os.path.join(directory, 'config.json')
    stale = [os.path.join(directory, n) for n in REMOTE_CODE] if carries_remote_code(old_config) else []
    try:
        for path, data in zip(paths, files.values()):
            with temp_file(path) as f:
                f.write(data)
        for path in [old_config] + stale:  # the old model's config.json first, then the code it named
            if os.path.exists(path) and path not in paths:
                os.remove(path)
        for path in paths:
            move_into_place(path)
    finally:  # (interrupted: no temp file of ours stays behind)
        for path in paths:
            if os.path.exists(temp_path(path)):
                os.remove(temp_path(path))
    write_json(os.path.join(directory, 'config.json'), hf)  # last: a directory without it is no model


def carries_remote_code(config_path):
    """Whether config_path is an export's config.json whose auto_map names the code it carries (REMOTE_CODE)."""
    try:
        with open(config_path) as f:
            return 'modeling_nanoponder' in json.dumps(json.load(f).get('auto_map'))
    except (OSError, ValueError, AttributeError):  # none, or no JSON object
        return False


# the code that a non-vanilla export carries for transformers' trust_remote_code: file name -> its source here
REMOTE_CODE = {'modeling_nanoponder.py': os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      'modeling_nanoponder.py'),
               'model.py': inspect.getsourcefile(GPT)}
REQUIRED = object()  # config_from_hf: a key without a default
HF_KINDS = {  # config.json value kinds: (test, what it must be)
    'size': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, 'an integer >= 1'),
    'count': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, 'an integer >= 0'),
    'positive': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, 'a number > 0'),
    'fraction': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                 'a number in (0, 1]'),
    'flag': (lambda v: isinstance(v, bool), 'true or false (unquoted)'),
    'text': (lambda v: isinstance(v, str), 'a string'),
    'object': (lambda v: isinstance(v, dict), 'a JSON object'),
    'range': (lambda v: isinstance(v, list) and len(v) == 2 and all(HF_KINDS['count'][0](x) for x in v),
              'a list of two integers >= 0'),
}


def checked(key, value, kind):
    """value of config.json's key, if it is of kind (HF_KINDS); else a ValueError naming the key."""
    ok, what = HF_KINDS[kind]
    if not ok(value):
        raise ValueError(f"config.json has {key}={json.dumps(value)}, but it must be {what}")
    return value


# the official PonderLM-2 code's --patch_method: which GPT-NeoX modeling file reads num_latent_thoughts, as what
PATCH_METHODS = {'ours': 'n_thoughts', 'pause': 'n_pause', 'loop': 'n_loop', 'ponderlm': 'n_hidden', 'vanilla': None}


def config_from_hf(hf, patch_method=None):
    """GPTConfig from a GPT-NeoX config.json (a dict; old and new key names), with the method keys of the
    official PonderLM-2 / PonderingLM code: num_latent_thoughts, num_jacobi_iterations, random_jacobi_iterations,
    interpolation, interpolation_use_topk, scale_embeds, recurrent_model, ponderinglm, pondering_steps,
    mutiply_pondering_steps (sic), pause_token_id; num_latent_thoughts counts the steps of the method that
    patch_method names (the official --patch_method: the argument, else config.json's patch_method, which our
    export writes, else 'ours', PonderLM-2); jacobi_train_range (only our export writes it) is checked, and read by
    jacobi_train_range_from_hf: it is a setting of the training run, not of the model. A missing or mistyped
    field, or a value that would compute something this model does not, is a ValueError naming the key."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds a JSON {type(hf).__name__}, not an object of GPT-NeoX keys")

    def get(key, default=REQUIRED, kind='size'):
        if hf.get(key) is None:  # absent, or null
            if default is REQUIRED:
                raise ValueError(f"config.json lacks {key}: it is no GPT-NeoX config")
            return default
        return checked(key, hf[key], kind)

    model_type = get('model_type', 'gpt_neox', 'text')
    if model_type not in ('gpt_neox', 'nanoponder'):  # nanoponder: our export with its code (save_pretrained)
        raise ValueError(f"model_type {model_type!r} is not supported: this model is GPT-NeoX (Pythia), 'gpt_neox'")
    act = get('hidden_act', 'gelu', 'text')
    if act != 'gelu':
        raise ValueError(f"hidden_act {act!r} is not supported: only the exact 'gelu' of GPT-NeoX/Pythia")
    # The official default of interpolation is True, but the official loader writes it into every config.json
    # it saves; a config without it is a stock GPT-NeoX one, which has no interpolation.
    if get('interpolation', False, 'flag'):
        raise ValueError("interpolation=true (thoughts as probability-weighted token embeddings) is not supported "
                         "by this implementation: only PonderLM-2's interpolation=false (the hidden state itself)")
    # Ignored, as they change no logits: interpolation_use_topk (the official code reads it only with
    # interpolation on); recurrent_model (its loader's "pondering on" switch, true for every method but
    # vanilla, which its GPT-NeoX PonderLM-2 model never reads; its Loop and hidden-feedback files do: see
    # below); output_hidden_states; classifier_dropout.
    if not get('attention_bias', True, 'flag'):
        raise ValueError("attention_bias=false is not supported: GPT-NeoX has biases everywhere")
    rope = get('rope_parameters', None, 'object') or get('rope_scaling', None, 'object') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
        raise ValueError(f"rope type {rope_type!r} is not supported, only 'default'")
    rotary_pct = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', hf.get('rotary_pct', 0.25)))
    rotary_base = rope.get('rope_theta', hf.get('rope_theta', hf.get('rotary_emb_base', 10000)))
    n_head, n_embd = get('num_attention_heads'), get('hidden_size')
    if n_embd % n_head:
        raise ValueError(f"config.json has hidden_size={n_embd}, not divisible by num_attention_heads={n_head}")
    # the official configs of every method but PonderingLM count its steps in num_latent_thoughts, and do not say
    # which modeling file trained them: our exports write patch_method, else the caller says (default 'ours')
    patch_method = patch_method or get('patch_method', 'ours', 'text')
    if patch_method not in PATCH_METHODS:
        raise ValueError(f"patch_method {patch_method!r} is none of the official ones: {', '.join(PATCH_METHODS)}")
    counts = dict.fromkeys(METHOD_COUNTS, 0)
    if PATCH_METHODS[patch_method]:
        counts[PATCH_METHODS[patch_method]] = get('num_latent_thoughts', 0, 'count')
    counts['n_ponder'] = get('pondering_steps', 0, 'count') if get('ponderinglm', False, 'flag') else 0
    if patch_method in ('loop', 'ponderlm') and any(counts.values()) and get('recurrent_model', True, 'flag') is False:
        raise ValueError(f"recurrent_model=false with patch_method={patch_method}: the official {patch_method} code "
                         f"then runs the plain trunk once, which this loader does not build; set it true (as the "
                         f"official scripts do) or load it as patch_method=vanilla")
    n_jacobi = get('num_jacobi_iterations', 3, 'count')
    get('random_jacobi_iterations', True, 'flag')
    jacobi_train_range_from_hf(hf)  # checked here, so that a mistyped one is refused on load
    # scale_embeds scales what a pondering model feeds back; the official vanilla baseline is stock GPT-NeoX,
    # which has no embedding scale whatever its config.json says (the official loader writes the key anyway)
    scale_embeds = get('scale_embeds', False, 'flag') and any(counts.values())
    return GPTConfig(
        block_size=get('max_position_embeddings', 2048),
        vocab_size=get('vocab_size'),
        n_layer=get('num_hidden_layers'),
        n_head=n_head,
        n_embd=n_embd,
        n_inner=get('intermediate_size', None),
        rotary_pct=float(checked('rotary_pct', rotary_pct, 'fraction')),
        rotary_base=float(checked('rotary_emb_base', rotary_base, 'positive')),
        parallel_residual=get('use_parallel_residual', True, 'flag'),
        layer_norm_eps=get('layer_norm_eps', 1e-5, 'positive'),
        n_jacobi=n_jacobi,
        **counts,
        pause_token_id=get('pause_token_id', 50288, 'count'),  # the official default
        ponder_multiply=get('mutiply_pondering_steps', False, 'flag'),  # (sic) the released key
        scale_embeds=scale_embeds,
    )


def jacobi_train_range_from_hf(hf):
    """The range (lo, hi) that training drew PonderLM-2's Jacobi passes R from: our export's jacobi_train_range, or
    what the official random_jacobi_iterations flag means (R in {2, 3, 4} when true, else num_jacobi_iterations)."""
    if hf.get('jacobi_train_range') is not None:
        return tuple(checked('jacobi_train_range', hf['jacobi_train_range'], 'range'))
    n_jacobi = hf.get('num_jacobi_iterations') if hf.get('num_jacobi_iterations') is not None else 3
    random = hf.get('random_jacobi_iterations')
    return (2, 4) if random is None or random else (n_jacobi, n_jacobi)


def hf_config(config, eos_id=0, jacobi_train_range=None):
    """A GPT-NeoX config.json (dict) for config, in the key names of Pythia's released configs, plus the method
    keys in the official code's spelling (config_from_hf reads it back). Stock transformers reads the
    GPT-NeoX part; the method keys are extra attributes it keeps but does not act on."""
    lo, hi = jacobi_train_range or (config.n_jacobi, config.n_jacobi)
    return {
        'architectures': ['GPTNeoXForCausalLM'],
        'model_type': 'gpt_neox',
        'vocab_size': config.vocab_size,
        'hidden_size': config.n_embd,
        'num_hidden_layers': config.n_layer,
        'num_attention_heads': config.n_head,
        'intermediate_size': config.n_inner or 4 * config.n_embd,
        'max_position_embeddings': config.block_size,
        'rotary_pct': config.rotary_pct,
        'rotary_emb_base': config.rotary_base,
        'use_parallel_residual': config.parallel_residual,
        'layer_norm_eps': config.layer_norm_eps,
        'hidden_act': 'gelu',
        'attention_bias': True,
        'tie_word_embeddings': False,
        'initializer_range': 0.02,
        'bos_token_id': eos_id,
        'eos_token_id': eos_id,
        'use_cache': True,
        'torch_dtype': 'float32',
        # PonderLM-2
        'num_latent_thoughts': config.n_thoughts or config.n_pause or config.n_loop or config.n_hidden,
        # which official modeling file computes this model (config_from_hf reads it back); PonderingLM has its own
        'patch_method': next((m for m, field in PATCH_METHODS.items() if field and getattr(config, field)),
                             'ours' if config.n_ponder else 'vanilla'),
        # only Pause has a pause row; transformers checks every *_token_id it finds against the vocabulary
        **({'pause_token_id': config.pause_token_id} if config.n_pause else {}),
        'num_jacobi_iterations': config.n_jacobi,
        'random_jacobi_iterations': lo < hi,
        'jacobi_train_range': [lo, hi],
        'interpolation': False,
        'interpolation_use_topk': False,
        'recurrent_model': config.method != 'vanilla',  # the official "pondering on" switch
        # PonderingLM (v1)
        'ponderinglm': config.n_ponder > 0,
        'pondering_steps': config.n_ponder,
        'mutiply_pondering_steps': config.ponder_multiply,  # (sic) the official key
        # both
        'scale_embeds': config.scale_embeds,
    }


def download_from_hub(repo_id):
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id!r} is not a local directory, and huggingface_hub (needed to download it) "
                           "is not installed: pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=['*.json', '*.safetensors'])
        if not any(f.endswith('.safetensors') for f in os.listdir(path)):
            path = snapshot_download(repo_id, allow_patterns=['*.json', '*.bin'])
    except Exception as e:
        offline = ': offline (HF_HUB_OFFLINE) and not in the cache' if constants.HF_HUB_OFFLINE else ''
        why = type(e).__name__ + offline
        raise RuntimeError(f"could not get {repo_id!r} from the Hugging Face Hub ({why}); "
                           "check the name and your connection, or pass a local directory") from None
    return path


def read_state_dict(path):
    """All tensors of a checkpoint directory: single or sharded, safetensors or PyTorch pickles. A missing,
    damaged or foreign file is an OSError or ValueError that names it."""
    for index_name, single in (('model.safetensors.index.json', 'model.safetensors'),
                               ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        index = os.path.join(path, index_name)
        files = [single]
        if os.path.exists(index):
            try:
                with open(index, encoding='utf-8') as f:
                    files = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is no sharded-weights index (a JSON object with a weight_map): "
                                 f"{type(e).__name__}: {e}") from None
        elif not os.path.exists(os.path.join(path, single)):
            continue
        sd = {}
        for name in files:
            sd.update(read_weights_file(os.path.join(path, str(name))))
        return sd
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or sharded index in {path}")


def read_weights_file(file):
    """The tensors of one weights file, by name."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"the weights file {file} is missing")
    try:
        if file.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(file)
        else:
            sd = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors alike; torch's advice (weights_only=False) is unsafe
        raise ValueError(f"cannot read the weights file {file} ({type(e).__name__}): it is damaged (cut short?) "
                         f"or no weights file; copy or download it again") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{file} holds no state dict (names -> tensors)")
    return sd


UNUSED_OFFICIAL_WEIGHTS = ('adapter.weight',)  # the official PonderingLM code makes nn.Linear(2H, H) and never uses it


def load_hf_weights(model, sd):
    """Copy a GPTNeoXForCausalLM state dict into our model (same module names, 'gpt_neox.' dropped). The
    official PonderingLM code's unused adapter.weight is skipped, with one note on stderr."""
    ignored = ('.attention.bias', '.attention.masked_bias', '.rotary_emb.inv_freq')  # buffers we recompute
    sd = {k.removeprefix('gpt_neox.'): v for k, v in sd.items() if not k.endswith(ignored)}
    unused = [k for k in UNUSED_OFFICIAL_WEIGHTS if k in sd]
    if unused:
        print(f"note: ignoring {', '.join(unused)}: a layer the official PonderingLM code creates and never uses",
              file=sys.stderr)
        sd = {k: v for k, v in sd.items() if k not in unused}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, p in ours.items():
            if sd[k].shape != p.shape:
                raise ValueError(f"checkpoint weight {k} has shape {tuple(sd[k].shape)}, model expects {tuple(p.shape)}")
            p.copy_(sd[k])  # copy_ casts, so bf16 checkpoints load into fp32 models and back
