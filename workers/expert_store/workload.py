"""Deterministic token chunks from the demo models' corpus (stdlib .py files) for traces/benchmarks."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from batonserve.workers.models.bundled.demo_corpus import load_corpus


def corpus_chunks(
    model_dir: Path, split: str, num_chunks: int, length: int, stride_files: int = 7
) -> list[list[int]]:
    """`num_chunks` chunks of `length` tokens: the start of every `stride_files`-th file of a split.

    split is "train" (predictor training, popularity counts) or "heldout" (benchmarks).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: must be 'train' or 'heldout', got {split!r}")
    corpus = load_corpus()
    files = corpus.train if split == "train" else corpus.heldout
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    bos = [eos] if eos is not None else []
    chunks: list[list[int]] = []
    for f in files[::stride_files] if stride_files > 1 else files:
        ids = bos + tok.encode(f.text, add_special_tokens=False).ids
        if len(ids) >= length:
            chunks.append(ids[:length])
        if len(chunks) == num_chunks:
            return chunks
    if stride_files > 1:  # too few long files at this stride: take every file
        return corpus_chunks(model_dir, split, num_chunks, length, stride_files=1)
    if not chunks:
        raise ValueError(f"split {split!r}: no file has {length} tokens")
    return chunks
