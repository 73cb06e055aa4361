"""Data: tokenizers, corpora (built-in stdlib, text files, JSONL), packing, synthetic tasks."""
from .corpus import Corpus, TokenSplit, cache_dir, find_documents, open_corpus
from .packing import Batch, BatchSampler, PackedSequences, eval_batches, segment_positions
from .synthetic import (InductionHeads, Phonebook, SelectiveCopying, SyntheticSampler, answer_accuracy,
                        make_task)
from .tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch", "BatchSampler", "ByteTokenizer", "Corpus", "HFTokenizer", "InductionHeads", "PackedSequences",
    "Phonebook", "SelectiveCopying", "SentencePieceTokenizer", "SyntheticSampler", "TokenSplit", "Tokenizer",
    "answer_accuracy", "cache_dir", "eval_batches", "find_documents", "load_tokenizer", "make_task",
    "open_corpus", "segment_positions",
]
