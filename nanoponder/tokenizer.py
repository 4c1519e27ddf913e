"""
Tokenizers: the Pythia one (from the Hugging Face cache or Hub), gpt2 (tiktoken), any tokenizer.json, a byte-level
BPE trained on the data; and which tokenizer goes with a data directory, a checkpoint or a Hugging Face model.

    from nanoponder.tokenizer import load_tokenizer, data_dir_tokenizer
    tok = data_dir_tokenizer('data/shakespeare-bpe512')       # the tokenizer that data was made with
    ids = tok.encode('To be'); text = tok.decode(ids)
"""
import hashlib
import json
import os
import sys

from nanoponder.data import MAX_VOCAB, data_tokenizer_file, read_meta
from nanoponder.runtime import UserError, failure, one_line

PYTHIA_REPO = 'EleutherAI/pythia-70m'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


class Tokenizer:
    """encode(text) -> list[int] and decode(ids) -> str, plus name, eos_id, vocab_size, path (the tokenizer.json
    it came from; None for gpt2 and for one a checkpoint carries) and json_text (that tokenizer.json's text; None
    for gpt2)."""

    def __init__(self, name, encode, decode, eos_id, vocab_size, path=None, json_text=None):
        self.name, self.eos_id, self.vocab_size, self.path = name, eos_id, vocab_size, path
        self.encode, self.decode, self.json_text = encode, decode, json_text

    @property
    def sha256(self):
        """Its identity: sha256 of its tokenizer.json (the file's bytes), or of its name for gpt2 (no file)."""
        text = self.json_text if self.json_text is not None else self.name
        return hashlib.sha256(text.encode('utf-8')).hexdigest()

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def hub_offline():
    return os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False')


def pythia_tokenizer_cached():
    """Whether the Pythia tokenizer.json is in the Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(PYTHIA_REPO, 'tokenizer.json'), str)
    except Exception:
        return False


def pythia_tokenizer_path():
    """The GPT-NeoX-20B tokenizer.json every Pythia model uses, from the Hugging Face cache or Hub."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line error
        try:
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json', local_files_only=True)
        except Exception:
            if hub_offline():
                raise
            print(f"fetching tokenizer.json of {PYTHIA_REPO} from the Hugging Face Hub...", file=sys.stderr)
            return hf_hub_download(PYTHIA_REPO, 'tokenizer.json', etag_timeout=10)
    except Exception as e:
        raise failure(f"could not get the Pythia tokenizer ({PYTHIA_REPO} tokenizer.json): {one_line(e, 200)}; "
                      f"offline? pass --tokenizer=PATH/to/tokenizer.json") from None


def load_tokenizer_json(path, name, eos_token='<|endoftext|>'):
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')  # bytes, not text mode: the text must be the file's bytes (sha256)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tokenizer {path}: {one_line(e)}") from None
    return tokenizer_from_json(text, name, eos_token, path)


def tokenizer_from_json(text, name, eos_token='<|endoftext|>', path=None):
    """A Tokenizer from the text of a tokenizer.json: the file at path, or (path None) the copy a checkpoint carries."""
    from tokenizers import Tokenizer as HFTokenizer
    where = path or f"{name} (the checkpoint's copy)"
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UserError(f"tokenizer {where} is not valid JSON ({one_line(e)}): it should be a Hugging Face "
                        f"tokenizer.json") from None
    if not isinstance(spec, dict) or 'model' not in spec:
        raise UserError(f"{where} is JSON but not a Hugging Face tokenizer.json (it has no 'model' entry)")
    try:
        tok = HFTokenizer.from_str(text)  # the text as read: no second serialization of a 2 MB file
    except Exception as e:
        raise UserError(f"{where} is not a tokenizer the tokenizers library can read: {one_line(e)}") from None
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise UserError(f"tokenizer {where} has no {eos_token} token (the end of a document): to prepare data with "
                        f"it, name its own in prepare_data.py --eos_token=...; to run a model, pass the tokenizer "
                        f"it was trained with")
    # the largest id + 1, not the number of entries: added tokens may leave gaps
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    # add_special_tokens=False: no BOS/EOS templates, documents are delimited by us;
    # skip_special_tokens=False: decode must give back everything (special tokens included)
    return Tokenizer(name, lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False), eos_id, vocab_size,
                     path, text)


def load_gpt2_tokenizer():
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise failure(f"tiktoken's gpt2 encoding (downloaded on first use) failed: {one_line(e)}") from None
    # encode_ordinary: a literal '<|endoftext|>' inside a document stays text, not EOS
    return Tokenizer('gpt2', enc.encode_ordinary, lambda ids: enc.decode([int(i) for i in ids]), enc.eot_token,
                     enc.n_vocab)


def load_tokenizer(name_or_path, eos_token='<|endoftext|>'):
    """'pythia', 'gpt2', a tokenizer.json path, or a directory holding one (e.g. a prepared data dir)."""
    if name_or_path == 'gpt2':
        tok = load_gpt2_tokenizer()
    elif name_or_path == 'pythia':
        tok = load_tokenizer_json(pythia_tokenizer_path(), 'pythia', eos_token)
    elif os.path.isfile(name_or_path) or os.path.isfile(os.path.join(name_or_path, 'tokenizer.json')):
        path = name_or_path if os.path.isfile(name_or_path) else os.path.join(name_or_path, 'tokenizer.json')
        path = os.path.abspath(path)
        tok = load_tokenizer_json(path, path, eos_token)
    elif name_or_path.endswith('.json') or os.sep in name_or_path:
        raise UserError(f"tokenizer file not found: {name_or_path}")
    elif bpe_size(name_or_path):
        raise UserError(f"tokenizer {name_or_path} is trained by prepare_data.py and saved with its data: load that "
                        f"data directory's tokenizer.json")
    else:
        raise UserError(f"unknown tokenizer '{name_or_path}' (expected pythia, gpt2 or a path to a tokenizer.json)")
    if tok.vocab_size >= MAX_VOCAB:  # 65535 stays free, so no id can alias a uint16 overflow
        raise UserError(f"tokenizer {name_or_path} has {tok.vocab_size} ids; uint16 token files need fewer "
                        f"than {MAX_VOCAB}")
    return tok


def bpe_size(spec):
    """'bpe:N' -> N, checked; None for any other tokenizer spec."""
    if not spec.startswith('bpe:'):
        return None
    try:
        n = int(spec[len('bpe:'):])
    except ValueError:
        raise UserError(f"tokenizer={spec!r}: write bpe:N with a whole number of ids, e.g. bpe:512") from None
    if not 257 <= n < MAX_VOCAB:
        raise UserError(f"tokenizer={spec!r}: a byte-level BPE needs 257 <= N < {MAX_VOCAB} ids (256 bytes + the "
                        f"end-of-document token + merges)")
    return n


def train_bpe(texts, vocab_size, path, eos_token='<|endoftext|>'):
    """A byte-level BPE with exactly vocab_size ids (eos_token = 0, the 256 bytes, then the merges) trained on texts
    (an iterable of strings); saved as a tokenizer.json at path, which the caller chooses and removes on failure.
    Byte-level: every text round-trips exactly, whatever its characters."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.save(path)
    tok = load_tokenizer_json(path, f'bpe:{vocab_size}', eos_token)
    if tok.vocab_size != vocab_size:  # too little text to learn that many merges
        raise UserError(f"the training text has only enough distinct pairs for {tok.vocab_size} BPE ids, not "
                        f"{vocab_size}: ask for fewer (bpe:{tok.vocab_size}) or give more text")
    return tok


def data_dir_tokenizer(data_dir):
    """The tokenizer a prepared data directory was made with: its tokenizer.json copy, else meta's 'tokenizer'."""
    meta = read_meta(data_dir)
    eos = meta.get('eos_token', '<|endoftext|>')  # the data's own end-of-document token, if not the default
    tok_file = data_tokenizer_file(data_dir, meta)
    if tok_file:
        tok = load_tokenizer(tok_file, eos)
        tok.name = meta.get('tokenizer', tok.name)
        return tok
    if not meta.get('tokenizer'):
        raise UserError(f"cannot tell the tokenizer of {data_dir}: no tokenizer.json, and no meta.json naming one; "
                        f"pass --tokenizer=pythia|gpt2|path/to/tokenizer.json")
    return load_tokenizer(meta['tokenizer'], eos)


def tokenizer_record(data_dir, meta):
    """What a checkpoint keeps of its data's tokenizer (Checkpoint.tokenizer), to be used without data_dir: 'json'
    is None when the data directory's tokenizer cannot be loaded (gpt2 has no file: its name is all of it)."""
    try:
        json_text = data_dir_tokenizer(data_dir).json_text
    except UserError:  # e.g. a BPE's tokenizer.json deleted from the data: the caller says what that means
        json_text = None
    return {'name': meta.get('tokenizer'), 'eos_token': meta.get('eos_token', '<|endoftext|>'), 'json': json_text,
            'sha256': meta['tokenizer_sha256']}


def tokenizer_mismatch(ckpt, data_dir, meta):
    """Why data_dir's ids are not the ones the checkpoint was trained on (another tokenizer), or None (the same
    tokenizer, or one of them unknown: data or a checkpoint from before they recorded it)."""
    ours, theirs = (ckpt.tokenizer or {}).get('sha256'), meta.get('tokenizer_sha256')
    if not ours or not theirs or ours == theirs:
        return None
    return (f"{data_dir} was prepared with another tokenizer ({meta.get('tokenizer')}, sha256 {theirs[:12]}) than "
            f"the checkpoint's training data ({ckpt.tokenizer.get('name')}, sha256 {ours[:12]})")


def checkpoint_tokenizer(ckpt):
    """The tokenizer of a training checkpoint's data: the copy it carries, else (a checkpoint saved
    before they carried one) its data directory's."""
    kept = ckpt.tokenizer
    if kept and kept.get('json') is not None:
        return tokenizer_from_json(kept['json'], kept['name'], kept['eos_token'])
    if kept and kept.get('name') == 'gpt2':  # no file to keep: the name is all of it
        return load_tokenizer('gpt2')
    data_dir = checkpoint_data_dir(ckpt)
    why = "its data had no tokenizer.json" if kept else "it was saved by an older train.py"
    if not os.path.isdir(data_dir):
        raise UserError(f"the checkpoint carries no tokenizer ({why}) and its data_dir {data_dir} is gone: pass "
                        f"--tokenizer=PATH (the tokenizer.json it was trained with, or a data directory prepared "
                        f"with it; or pythia, gpt2)")
    try:
        return data_dir_tokenizer(data_dir)
    except UserError as e:
        raise UserError(f"the checkpoint carries no tokenizer ({why}), and its data_dir's: {e}; pass "
                        f"--tokenizer=PATH (the tokenizer.json it was trained with; or pythia, gpt2)") from None


def checkpoint_data_dir(ckpt):
    """The data directory a training checkpoint was trained on. A relative data_dir is relative to where the
    training ran: when it is not there from here, try the repository."""
    data_dir = (ckpt.config or {}).get('data_dir')
    if not data_dir:
        raise UserError("the checkpoint does not record its data_dir; pass --tokenizer=pythia|gpt2|PATH")
    if not os.path.isdir(data_dir):
        here = os.path.join(REPO, data_dir)
        data_dir = here if os.path.isdir(here) else data_dir
    return data_dir


def hub_tokenizer_path(repo_id):
    """tokenizer.json of a hub model (loading the model has usually cached it already); None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, 'tokenizer.json')
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of the next one: it must come first)
        raise failure(f"could not get tokenizer.json of {repo_id} (offline?); "
                      f"pass --tokenizer=path/to/tokenizer.json") from None
    except EntryNotFoundError:  # the repository has no tokenizer.json
        return None
    except Exception as e:
        raise failure(f"could not get tokenizer.json of {repo_id} ({type(e).__name__}); "
                      f"pass --tokenizer=path/to/tokenizer.json") from None


def model_tokenizer(init_from, ckpt=None, override='', vocab_size=None):
    """The tokenizer that goes with a model: override (pythia | gpt2 | a path) if given; for a training
    checkpoint the one its training data was prepared with (checkpoint_tokenizer); for a Hugging Face model
    (directory or hub id) the tokenizer.json beside its weights. vocab_size: the model's; a tokenizer with more ids
    is not its tokenizer (a UserError)."""
    if override:
        tok = load_tokenizer(override)
    elif ckpt is not None:
        tok = checkpoint_tokenizer(ckpt)
    else:
        path = os.path.join(init_from, 'tokenizer.json') if os.path.isdir(init_from) else hub_tokenizer_path(init_from)
        if path is None or not os.path.isfile(path):
            raise UserError(f"no tokenizer.json beside the weights of {init_from}; pass --tokenizer=pythia "
                            f"(every Pythia-based model uses it) or --tokenizer=path/to/tokenizer.json")
        tok = load_tokenizer(path)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer {tok.name} has {tok.vocab_size:,} ids, more than the model's vocabulary of "
                        f"{vocab_size:,}: it is not this model's tokenizer; pass the one it was trained with, "
                        f"--tokenizer=path/to/tokenizer.json")
    return tok


def safe_decode(tok, ids):
    """Text of ids, leaving out ids the tokenizer does not have: the model's vocabulary is padded (Pythia's
    50304 rows against the tokenizer's 50277 ids), and an untrained padding row can still be sampled."""
    return tok.decode([i for i in ids if i < tok.vocab_size])


class TextStream:
    """Prints the text of a growing list of token ids as it grows. A character made of several tokens
    (a byte-level BPE splits emoji and CJK into bytes) decodes to U+FFFD until its last byte comes, so text
    ending in U+FFFD waits for the next token. Each step decodes only the ids since the last printed chunk,
    plus that chunk again as context (a decoder may treat a token differently at the start of the text)."""

    def __init__(self, decode, ids):
        self.decode, self.ids = decode, list(ids)
        # ids[prefix:read] were printed already (kept as context); ids[read:] are not yet
        self.prefix, self.read = max(0, len(self.ids) - 5), len(self.ids)

    def add(self, token):
        self.ids.append(token)
        done = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith('\ufffd'):
            self.write(text[len(done):])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self):
        done = self.decode(self.ids[self.prefix:self.read])
        self.write(self.decode(self.ids[self.prefix:])[len(done):] + '\n')

    @staticmethod
    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()
