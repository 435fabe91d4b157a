"""Data layer of the MoE language-model demo: corpus, tokenizer, seeded batches, token categories.

Typical use::

    corpus = load_kjv()                               # or load_text("--data PATH")
    train, val = corpus.split(SplitConfig(every=20))  # held-out whole chapters
    tok = BPETokenizer.train(v.text for v in train)   # byte-level BPE, vocab 2048
    stream = TokenStream.from_corpus(train, tok)     # token ids + aligned Bible-part ids
    sampler = BatchSampler(stream, BatchConfig(batch_size=16, block_size=128, seed=0))
    batch = sampler.batch(step)                       # tokens, part_ids (B, L+1); pure in (seed, step)
"""

from moekit.data.batches import (
    Batch,
    BatchConfig,
    BatchSampler,
    TokenDataset,
    TokenStream,
    num_validation_batches,
    validation_batches,
)
from moekit.data.categories import CATEGORY_NAMES, STOP_WORDS, category_ids, token_categories, token_category
from moekit.data.corpus import BOOK_PARTS, BOOKS, PART_NAMES, Corpus, SplitConfig, Verse, load_kjv, load_text
from moekit.data.tokenizer import EOT, BPETokenizer, TokenizerConfig, train_tokenizer

__all__ = [
    "BOOKS",
    "BOOK_PARTS",
    "CATEGORY_NAMES",
    "EOT",
    "PART_NAMES",
    "STOP_WORDS",
    "BPETokenizer",
    "Batch",
    "BatchConfig",
    "BatchSampler",
    "Corpus",
    "SplitConfig",
    "TokenDataset",
    "TokenStream",
    "TokenizerConfig",
    "Verse",
    "category_ids",
    "load_kjv",
    "load_text",
    "num_validation_batches",
    "token_categories",
    "token_category",
    "train_tokenizer",
    "validation_batches",
]
