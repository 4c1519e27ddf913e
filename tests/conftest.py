"""Shared test fixtures: random text and a tiny byte-level BPE tokenizer trained on it, made in the test
(no network, no ../shared), and the test module's tokenizer loaded. pytest.ini puts the repository on the import
path; the shared plain functions and constants (ROOT, ENV, tiny models, ...) are in helpers.py."""
import random

import pytest


def random_text(rng, words, n_lines, max_words=12):
    """n_lines lines of 1..max_words words drawn from words."""
    return ''.join(' '.join(rng.choice(words) for _ in range(rng.randint(1, max_words))) + '\n'
                   for _ in range(n_lines))


def train_tokenizer(path, words, max_words=12):
    """Save a byte-level BPE tokenizer (<|endoftext|> = 0, vocabulary 300) trained on text made of words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    tok.train_from_iterator([random_text(rng, words, 20, max_words) for _ in range(50)], trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope='session')
def make_text():
    """random_text(rng, words, n_lines, max_words=12) -> text."""
    return random_text


@pytest.fixture(scope='session')
def tiny_tokenizer(tmp_path_factory):
    """A factory: tiny_tokenizer(words, max_words) -> path of a tokenizer.json trained on text of those words."""
    return lambda words, max_words=12: train_tokenizer(tmp_path_factory.mktemp('tok') / 'tokenizer.json',
                                                       words, max_words)


@pytest.fixture(scope='module')
def tok(tokenizer_json):
    """The tokenizer of the test module's own tokenizer_json fixture, loaded."""
    from nanoponder.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_json)
