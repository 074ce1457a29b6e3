"""Parity with Hugging Face transformers on tiny random models of every supported architecture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import ARCHS, load_hf_model
from testkit.paged_batch import PagedSeqs

from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner

ATOL = 1e-4


def _prompts(vocab: int, lens: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """HF logits [len, vocab] of one sequence, full forward, no cache."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_varlen_prefill_logits_match_hf(arch: str, hf_tiny_dir: Callable[..., Path]) -> None:
    """Several prompts of different lengths in one varlen batch: every row's logits within 1e-4."""
    path = hf_tiny_dir(arch)
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_kv_blocks=48, block_size=4))
    hf = load_hf_model(path)
    prompts = _prompts(runner.model_config.vocab_size, [1, 5, 12, 23], seed=1)
    seqs = PagedSeqs(block_size=4, num_blocks=48)
    batch = seqs.step({seqs.add(): p for p in prompts}, all_logits=True)
    logits = runner.execute(batch)
    assert logits.dtype == torch.float32 and logits.shape == (41, runner.model_config.vocab_size)
    ref = torch.cat([_hf_logits(hf, p) for p in prompts])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_chunked_prefill_and_decode_match_hf(
    arch: str, hf_tiny_dir: Callable[..., Path]
) -> None:
    """Chunked prefill through the paged cache, then greedy decode steps in a mixed batch.

    Each step's logits match HF's full forward on the same tokens, and the greedy continuation is
    identical to HF's `generate`.
    """
    path = hf_tiny_dir(arch)
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_kv_blocks=64, block_size=4))
    hf = load_hf_model(path)
    prompts = _prompts(runner.model_config.vocab_size, [9, 14, 3], seed=2)
    seqs = PagedSeqs(block_size=4, num_blocks=64, seed=3)
    a, b, c = seqs.add(), seqs.add(), seqs.add()
    # Step 1: seq a's whole prompt, the first 6 tokens of seq b (a chunk, no logits needed).
    runner.execute(seqs.step({a: prompts[0], b: prompts[1][:6]}))
    # Step 2: the rest of b (prefix cached), all of c, and a's first decode token in one batch.
    first_a = int(torch.argmax(_hf_logits(hf, prompts[0])[-1]))
    logits = runner.execute(seqs.step({a: [first_a], b: prompts[1][6:], c: prompts[2]}))
    for row, seq in enumerate((a, b, c)):
        ref = _hf_logits(hf, seqs.tokens[seq])[-1]
        torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=0)
    steps = 8
    nxt = {s: int(torch.argmax(logits[i])) for i, s in enumerate((a, b, c))}
    for _ in range(steps):
        logits = runner.execute(seqs.step({s: [t] for s, t in nxt.items()}))
        for row, seq in enumerate((a, b, c)):
            ref = _hf_logits(hf, seqs.tokens[seq])[-1]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=0)
        nxt = {s: int(torch.argmax(logits[i])) for i, s in enumerate((a, b, c))}
    hf.generation_config.eos_token_id = None  # compare full-length continuations
    for seq, prompt in zip((b, c), prompts[1:], strict=True):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=steps + 1,
                do_sample=False,
                pad_token_id=0,
            )
        assert [*seqs.tokens[seq], nxt[seq]] == gen[0].tolist()


def test_sliding_window_matches_hf_and_changes_the_result(
    hf_tiny_dir: Callable[..., Path],
) -> None:
    """Mistral with a window shorter than the prompt: parity with HF, and differs from full attention."""
    path = hf_tiny_dir("mistral", sliding_window=5)
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_kv_blocks=32, block_size=4))
    assert runner.model_config.sliding_window == 5
    hf = load_hf_model(path)
    prompt = _prompts(runner.model_config.vocab_size, [13], seed=4)[0]
    seqs = PagedSeqs(block_size=4, num_blocks=32)
    s = seqs.add()
    logits = runner.execute(seqs.step({s: prompt[:9]}, all_logits=True))
    torch.testing.assert_close(logits, _hf_logits(hf, prompt[:9]), atol=ATOL, rtol=0)
    for tok in prompt[9:]:  # decode steps across the window edge
        logits = runner.execute(seqs.step({s: [tok]}))
        torch.testing.assert_close(logits[0], _hf_logits(hf, seqs.tokens[s])[-1], atol=ATOL, rtol=0)
    full = load_hf_model(hf_tiny_dir("mistral"))
    assert not torch.allclose(logits[0], _hf_logits(full, seqs.tokens[s])[-1], atol=1e-2)
