"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, optional top-n logprobs.

Every operation is row-wise, and a seeded request draws its noise from its own generator, so a
request's tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per logits row."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (one per seeded request)."""
    return torch.Generator(device=device).manual_seed(seed)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set every token outside each row's top-k / top-p nucleus to -inf.

    logits: [rows, vocab] float32; top_k: [rows] int64 (0 = off); top_p: [rows] float32.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


class Sampler:
    """Turns logits rows into tokens according to each row's SamplingParams."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        # Requests without a seed share this generator (reproducible per engine, not per request).
        self.default_generator = make_generator(seed, self.device)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        """Sample one token per row. logits: [rows, vocab] float32; generators: per row or None."""
        rows = logits.shape[0]
        assert len(params) == rows and len(generators) == rows
        if rows == 0:
            return SamplerOutput((), ())
        # [rows]; greedy rows keep this. max().indices: first maximum, as argmax, but faster on CPU.
        tokens = logits.max(dim=-1).indices
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            tokens = tokens.clone()
            idx = torch.tensor(random_rows, device=logits.device)
            sub = logits.index_select(0, idx)  # [r, vocab]
            temp = torch.tensor([params[i].temperature for i in random_rows], device=logits.device)
            sub = sub / temp.unsqueeze(1)
            if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in random_rows):
                top_k = torch.tensor([params[i].top_k for i in random_rows], device=logits.device)
                top_p = torch.tensor(
                    [params[i].top_p for i in random_rows],
                    device=logits.device,
                    dtype=torch.float32,
                )
                sub = apply_top_k_top_p(sub, top_k, top_p)
            probs = sub.softmax(dim=-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; E is per row from the
            # row's own generator, so the draw ignores the rest of the batch.
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                gen = generators[i] or self.default_generator
                noise[j].exponential_(generator=gen)
            picked = (probs / noise).argmax(dim=-1)
            tokens[idx] = picked
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * rows
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lp = logits[want].log_softmax(dim=-1)  # [w, vocab]
            for j, i in enumerate(want):
                n = params[i].logprobs or 0
                top: tuple[tuple[int, float], ...] = ()
                if n > 0:
                    vals, ids = lp[j].topk(min(n, lp.shape[-1]))
                    top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
                tok = token_list[i]
                logprobs[i] = TokenLogprobs(tok, float(lp[j, tok]), top)
        return SamplerOutput(tuple(token_list), tuple(logprobs))
