"""Tokenizer, corpora, packing with segment positions, and synthetic tasks."""
import json
import os

import numpy as np
import pytest

from griffinlm.data import (BatchSampler, ByteTokenizer, InductionHeads, PackedSequences, Phonebook,
                            SelectiveCopying, SyntheticSampler, eval_batches, find_documents, make_task,
                            open_corpus, segment_positions)

TOK = ByteTokenizer()
SPECIALS = (TOK.bos_id, TOK.eos_id, TOK.pad_id)


def write_docs(root, texts):
    os.makedirs(root, exist_ok=True)
    for i, t in enumerate(texts):
        with open(os.path.join(root, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(t)
    return str(root)


def test_byte_tokenizer_round_trip():
    for text in ["", "hello", "déjà vu — ✓ 🐍", "tabs\tand\nnewlines\r\n", "\x00\x7f"]:
        ids = TOK.encode(text)
        assert ids.dtype == np.uint16 and len(ids) == len(text.encode("utf-8"))
        assert TOK.decode(ids) == text
    assert TOK.vocab_size == 259 and {TOK.bos_id, TOK.eos_id, TOK.pad_id} == {256, 257, 258}
    assert TOK.decode([TOK.bos_id, *TOK.encode("ab"), TOK.eos_id, TOK.pad_id]) == "ab"
    assert TOK.encode(b"\xff\xfe").tolist() == [255, 254]  # raw bytes pass through
    assert TOK.decode([0xFF]) == "\ufffd"  # invalid UTF-8 from a model does not raise


def test_stdlib_corpus_is_real_deterministic_and_split_by_document(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIFFINLM_CACHE", str(tmp_path))
    train, val = find_documents("stdlib")
    train_ids, val_ids = {d.doc_id for d in train}, {d.doc_id for d in val}
    assert len(train) > 300 and 1 <= len(val) < 0.05 * len(train)
    assert not train_ids & val_ids
    assert [d.doc_id for d in train] == sorted(train_ids)
    assert not any("site-packages" in d for d in train_ids | val_ids)
    corpus = open_corpus("stdlib", TOK)
    assert corpus.train.num_bytes > 1_000_000 and corpus.val.num_bytes > 0
    assert isinstance(corpus.train.tokens, np.memmap)
    # one token per byte plus BOS/EOS per document
    assert len(corpus.train) == corpus.train.num_bytes + 2 * len(train)
    again = open_corpus("stdlib", TOK)  # from the cache
    assert again.directory == corpus.directory
    assert np.array_equal(again.val.tokens, corpus.val.tokens)
    start = corpus.train.doc_starts[1]
    assert corpus.train.tokens[start] == TOK.bos_id and corpus.train.tokens[start - 1] == TOK.eos_id


def test_directory_jsonl_and_single_file_corpora(tmp_path):
    cache = str(tmp_path / "cache")
    docs = [f"document {i}\n" * (5 + i) for i in range(30)]
    d = open_corpus(write_docs(tmp_path / "dir", docs), TOK, cache=cache)
    assert d.meta["splits"]["train"]["docs"] + d.meta["splits"]["val"]["docs"] == 30
    assert d.meta["splits"]["val"]["docs"] >= 1
    assert d.train.num_bytes + d.val.num_bytes == sum(len(t) for t in docs)

    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    j = open_corpus(str(jl), TOK, cache=cache)
    assert j.train.num_bytes + j.val.num_bytes == sum(len(t) for t in docs)
    with pytest.raises(ValueError, match="body"):
        open_corpus(str(jl), TOK, text_field="body", cache=cache)

    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(2000)))
    s = open_corpus(str(single), TOK, cache=cache)
    text = bytes(s.train.tokens[1:-1].astype(np.uint8)) + bytes(s.val.tokens[1:-1].astype(np.uint8))
    assert text == single.read_bytes()
    assert 0 < s.val.num_bytes < 0.05 * s.train.num_bytes
    assert bytes(s.val.tokens[1:6].astype(np.uint8)) == b"line "  # cut at a line start


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        open_corpus(str(tmp_path / "nope"), TOK, cache=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        open_corpus(str(tmp_path / "empty"), TOK, cache=str(tmp_path))
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        open_corpus(str(tmp_path / "zero.txt"), TOK, cache=str(tmp_path))


def test_packing_puts_boundaries_where_documents_end(tmp_path):
    docs = ["a" * 7, "bb" * 5, "c" * 3, "d" * 40, "e" * 9, "f" * 11]
    corpus = open_corpus(write_docs(tmp_path / "d", docs), TOK, cache=str(tmp_path / "c"))
    split = corpus.train
    stream = np.asarray(split.tokens, dtype=np.int64)
    packed = PackedSequences(split, 8, TOK.pad_id, SPECIALS)
    assert len(packed) == (len(stream) - 1) // 8
    batch = packed.get(np.arange(len(packed)))
    T = 8
    for i in range(len(packed)):
        idx = np.arange(i * T, i * T + T)
        assert batch.tokens[i].tolist() == stream[idx].tolist()
        assert batch.targets[i].tolist() == stream[idx + 1].tolist()
        # segment position 0 exactly at every BOS (document start), counting up inside a document
        pos = batch.segment_pos[i].numpy()
        assert ((pos == 0) == (stream[idx] == TOK.bos_id)).all()
        assert (pos == segment_positions(split.doc_starts, idx)).all()
        # never predict across a boundary: a BOS target is masked, every other target counts
        assert (batch.loss_mask[i].numpy() == (stream[idx + 1] != TOK.bos_id)).all()
    # bytes counted = non-special counted targets
    text_targets = (batch.loss_mask & (batch.targets < 256)).sum().item()
    assert batch.num_bytes == text_targets
    # the held-out split is covered completely, once, with a padded last window
    val = PackedSequences(corpus.val, 8, TOK.pad_id, SPECIALS, pad_last=True)
    assert sum(b.num_bytes for b in eval_batches(val, 3)) == corpus.val.num_bytes
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        PackedSequences(split, 1, TOK.pad_id, SPECIALS)
    with pytest.raises(ValueError, match="too few"):
        PackedSequences(corpus.val, 10_000, TOK.pad_id, SPECIALS)


def test_sampler_state_resumes_exactly(tmp_path):
    corpus = open_corpus(write_docs(tmp_path / "d", ["xyz" * 50] * 8), TOK, cache=str(tmp_path / "c"))
    packed = PackedSequences(corpus.train, 16, TOK.pad_id, SPECIALS)
    a = BatchSampler(packed, 5, seed=3)
    first = [a.next_batch().tokens for _ in range(4)]
    state = a.state_dict()
    rest = [a.next_batch().tokens for _ in range(30)]  # crosses epochs
    b = BatchSampler(packed, 5, seed=3)
    b.load_state_dict(state)
    assert all((x == b.next_batch().tokens).all() for x in rest)
    c = BatchSampler(packed, 5, seed=3)
    assert all((x == c.next_batch().tokens).all() for x in first)


def test_selective_copying_and_induction_heads():
    rng = np.random.default_rng(0)
    task = SelectiveCopying(length=20, num_tokens=4, vocab=6)
    b = task.sample(16, rng)
    assert b.tokens.shape == (16, task.seq_len) and int(b.tokens.max()) < task.vocab_size
    for i in range(16):
        ctx = b.tokens[i, :20]
        data = ctx[ctx != task.noise_id]
        assert b.tokens[i, 20] == task.sep_id
        assert b.targets[i][b.loss_mask[i]].tolist() == data.tolist()
    task = InductionHeads(length=30, vocab=5)
    b = task.sample(16, rng)
    assert b.loss_mask.sum(1).tolist() == [1] * 16
    for i in range(16):
        row = b.tokens[i].tolist()
        assert row[-1] == task.trigger_id
        first = row.index(task.trigger_id)
        assert b.targets[i, -1] == row[first + 1] and b.loss_mask[i, -1]


def test_phonebook_answers_are_the_queried_numbers():
    task = Phonebook(num_entries=6, name_len=4, num_digits=5)
    b = task.sample(8, np.random.default_rng(1))
    assert b.tokens.shape[1] == task.seq_len
    for i in range(8):
        text = TOK.decode(b.tokens[i].tolist())
        book = dict(line.split(": ") for line in text.split("\n")[:-1])
        query = text.split("\n")[-1][2:].split(": ")[0]  # inputs end inside the answer
        answer = TOK.decode(b.targets[i][b.loss_mask[i]].tolist())
        assert answer == book[query] + "\n" and len(book) == 6


def test_synthetic_sampler_and_errors():
    s = SyntheticSampler(make_task("induction_heads", length=10), 4, seed=0)
    s.next_batch()
    state = s.state_dict()
    x = s.next_batch().tokens
    s2 = SyntheticSampler(make_task("induction_heads", length=10), 4, seed=0)
    s2.load_state_dict(state)
    assert (s2.next_batch().tokens == x).all()
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("sorting")
    with pytest.raises(ValueError, match="num_tokens"):
        SelectiveCopying(length=4, num_tokens=5)


def test_local_tokenizers_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from griffinlm.data import load_tokenizer

    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    path = str(tmp_path / "tokenizer.json")
    tk.save(path)
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (tk.token_to_id("<s>"), tk.token_to_id("</s>"))
    assert tok.pad_id == tok.vocab_size - 1  # appended: the file has no PAD
    text = "def g(y):\n    return y + 1\n"
    assert tok.decode(tok.encode(text)) == text
    corpus = open_corpus(write_docs(tmp_path / "d", [text * 20] * 4), tok, cache=str(tmp_path / "c"))
    assert corpus.train.bytes_per_text_token > 1.5  # subwords: several bytes per token
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
