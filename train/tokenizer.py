"""A small CLIP tokenizer trained offline on chest X-ray prompts (the embedded default's).

The BPE model, normaliser and pre-tokenizer match what `transformers.CLIPTokenizer` builds
around a vocabulary, so the trained vocabulary and merges load into a plain `CLIPTokenizer`
and, saved with a pipeline, into any code that reads Stable Diffusion folders. Every single
byte-level symbol is in the vocabulary, with and without the end-of-word suffix, so that any
text tokenises without unknown tokens; words of the prompts are single tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import fields

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from hf_datasets.label_stats import LabelSampler
from hf_datasets.prompts import PromptConfig, PromptTemplates, build_prompt

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
MAX_LENGTH = 77
# CLIP's split: specials, English contractions, letter runs, single digits, punctuation runs
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
_BYTE_ALPHABET: tuple[str, ...] = tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))
_MIN_VOCAB = 2 + 2 * len(_BYTE_ALPHABET)


def prompt_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Report- and labels-style prompts with CheXpert-like labels, plus the template words."""
    sampler = LabelSampler()
    rng = np.random.default_rng(seed)
    styles = (PromptConfig(style="report", seed=seed), PromptConfig(style="labels", seed=seed))
    corpus = []
    for i in range(n):
        labels = sampler.labels(rng)
        sex, age = sampler.sex(rng), sampler.age(rng)
        view = "Lateral" if rng.random() < 0.1 else sampler.view(rng)
        config = styles[i % 2]
        corpus.append(
            build_prompt(labels, view=view, sex=sex, age=age, key=f"corpus{i}", config=config)
        )
    return corpus + _template_texts(PromptTemplates())


def _template_texts(templates: PromptTemplates) -> list[str]:
    """Every template sentence with its {placeholders} removed."""
    texts = []
    for f in fields(templates):
        value = getattr(templates, f.name)
        for text in [value] if isinstance(value, str) else value:
            texts.append(re.sub(r"\{\w+\}", " ", text))
    return texts


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1000) -> CLIPTokenizer:
    """A CLIPTokenizer of at most `vocab_size` tokens whose BPE is trained on the corpus."""
    if vocab_size <= _MIN_VOCAB:
        raise ValueError(f"vocab_size must be more than {_MIN_VOCAB}, got {vocab_size}")
    vocab, merges = _train_bpe(list(corpus), vocab_size)
    return CLIPTokenizer(
        vocab=_with_byte_symbols(vocab), merges=merges, model_max_length=MAX_LENGTH
    )


def _train_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a BPE trained on texts with CLIP's normaliser and splitting."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=SUFFIX))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # The trainer numbers end-of-word symbols in hash-map order as it meets them, and
        # breaks ties between merges by those numbers (huggingface/tokenizers#1794): listing
        # them up front fixes their ids and makes training deterministic.
        special_tokens=[BOS, EOS, *(symbol + SUFFIX for symbol in _BYTE_ALPHABET)],
        initial_alphabet=list(_BYTE_ALPHABET),
        end_of_word_suffix=SUFFIX,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _with_byte_symbols(vocab: dict[str, int]) -> dict[str, int]:
    """The vocabulary plus any missing byte symbol or its end-of-word form (none, normally)."""
    vocab = dict(vocab)
    for symbol in _BYTE_ALPHABET:
        for token in (symbol, symbol + SUFFIX):
            if token not in vocab:
                vocab[token] = len(vocab)
    return vocab
