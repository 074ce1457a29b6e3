"""Attention kernels: varlen causal prefill with a cached prefix, paged split-K decode, LSE merge.

Shapes: q [num_tokens, num_heads, head_dim]; a paged cache is [num_blocks, block_size, num_kv_heads,
head_dim]. GQA: query head h reads KV head h // (num_heads // num_kv_heads).

Each op has a "plan" step (index and mask tensors that depend only on the batch layout, built once per
forward and shared by every layer) and a "run" step per layer. The torch references here run on CPU;
fast paths can replace the run step by device without changing the plans' meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu.paged_attention import paged_attention_cpu, supports
from batonserve.kernels.dispatch import use_triton

NEG_INF = float("-inf")
PREFILL_C_MAX_Q = 512  # longest plain prompt (per chunk) the CPU kernel takes; SDPA above


@dataclass(frozen=True)
class PrefillPlan:
    """Padded-batch layout of a varlen prefill: sequence b's query i and key j become [b, i] and [b, j]."""

    q_index: torch.Tensor  # [B, max_q] int64 row of q for each padded query (0 in padding)
    q_valid: torch.Tensor  # [B, max_q] bool, real query rows
    k_index: torch.Tensor  # [B, max_k] int64 row of the key source (flat keys or cache slots)
    mask: torch.Tensor  # [B, 1, max_q, max_k] bool, True where query may attend key
    has_key: torch.Tensor  # [B, 1, max_q, 1] bool, the row sees at least one key
    all_have_keys: bool  # no real query row is empty (skip the zeroing pass)
    # The layout as lengths, for fast paths that mask from lengths instead of `mask` (kernels/triton).
    q_lens: torch.Tensor | None = None  # [B] int64
    k_lens: torch.Tensor | None = None  # [B] int64
    causal: bool = True
    sliding_window: int | None = None
    num_rows: int = 0  # real query rows (q_valid.sum()), the output's length
    # Paged keys, for the CPU kernel that reads them in place (kernels/cpu/paged_attention.py).
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    row_seq: torch.Tensor | None = None  # [num_rows] int64, sequence of each output row
    row_last: torch.Tensor | None = None  # [num_rows] int64, last key each output row sees


def _cpu_kernel_ok(q: torch.Tensor, k_cache: torch.Tensor, rows: int) -> bool:
    """The C kernel of kernels/cpu takes this call (CPU tensors it supports, at least one row)."""
    return rows > 0 and supports(q, k_cache)


def _lens(cu: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths from prefix sums [B + 1] -> [B] int64."""
    return (cu[1:] - cu[:-1]).long()


def plan_prefill(
    cu_q_lens: torch.Tensor,
    k_lens: torch.Tensor,
    *,
    k_starts: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    block_size: int = 0,
    causal: bool = True,
    sliding_window: int | None = None,
) -> PrefillPlan:
    """Build the padded layout for `prefill_attention`.

    Keys come either from a flat varlen tensor (sequence b's keys at rows k_starts[b] + j) or from a
    paged cache (key j of sequence b at slot block_tables[b, j // block_size] * block_size + j % block_size).
    Causal masking is bottom-right aligned: query i of a sequence with q_len queries and k_len keys
    sees keys [0, k_len - q_len + i], and with a sliding window W only the last W of those.
    `q_starts` [B] places sequence b's queries at rows q_starts[b] + i of q (default: cu_q_lens[:-1]),
    so a plan can cover a subset of a batch's sequences.
    """
    device = cu_q_lens.device
    q_lens = _lens(cu_q_lens)
    k_lens = k_lens.to(device=device, dtype=torch.long)
    num_seqs = int(q_lens.shape[0])
    max_q = int(q_lens.max()) if num_seqs else 0
    max_k = int(k_lens.max()) if num_seqs else 0
    qi = torch.arange(max_q, device=device)  # [max_q]
    kj = torch.arange(max_k, device=device)  # [max_k]
    q_valid = qi[None, :] < q_lens[:, None]  # [B, max_q]
    starts = cu_q_lens[:-1] if q_starts is None else q_starts  # first q row of each sequence
    q_index = torch.where(q_valid, starts.long()[:, None] + qi[None, :], 0)
    k_valid = kj[None, :] < k_lens[:, None]  # [B, max_k]
    if block_tables is not None:
        assert block_size > 0
        blocks = block_tables.long().gather(1, (kj // block_size)[None, :].expand(num_seqs, -1))
        k_index = blocks * block_size + (kj % block_size)[None, :]
    else:
        assert k_starts is not None
        k_index = k_starts.long()[:, None] + kj[None, :]
    k_index = torch.where(k_valid, k_index, 0)
    mask = k_valid[:, None, :].expand(num_seqs, max_q, max_k)  # [B, max_q, max_k]
    # Absolute key position each query stands at (bottom-right alignment).
    q_pos = (k_lens - q_lens)[:, None] + qi[None, :]  # [B, max_q]
    if causal:
        mask = mask & (kj[None, None, :] <= q_pos[:, :, None])
        if sliding_window is not None:
            mask = mask & (kj[None, None, :] > q_pos[:, :, None] - sliding_window)
    mask = mask & q_valid[:, :, None]
    has_key = mask.any(-1)[:, None, :, None]  # [B, 1, max_q, 1]
    # A row without any key would make softmax NaN; let it see key 0 and zero it afterwards.
    mask = mask | ~has_key[:, 0, :, :].expand_as(mask) & (kj == 0)[None, None, :]
    all_have_keys = bool(has_key[:, 0, :, 0][q_valid].all())
    row_seq = row_last = None
    # The CPU kernel takes a prefill with a cached prefix (no gathered copy), and plain prompts
    # (keys = the new tokens) up to PREFILL_C_MAX_Q rows: 1.2-3.7x faster than SDPA there on
    # the CI VM (bf16, 1 thread); SDPA's tiles win on longer prompts.
    cpu_rows = device.type == "cpu" and max_q <= PREFILL_C_MAX_Q
    if block_tables is not None and causal and (cpu_rows or bool((k_lens > q_lens).any())):
        row_seq = torch.arange(num_seqs, device=device)[:, None].expand(-1, max_q)[q_valid]
        row_last = q_pos[q_valid]
    return PrefillPlan(
        q_index,
        q_valid,
        k_index,
        mask[:, None],
        has_key,
        all_have_keys,
        q_lens,
        k_lens,
        causal,
        sliding_window,
        int(q_lens.sum()),
        block_tables,
        row_seq,
        row_last,
    )


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PrefillPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Varlen prefill attention over a plan; k/v are flat [rows, kv_heads, d] or a paged cache.

    Returns (out [num_tokens, num_heads, head_dim], lse [num_tokens, num_heads] float32 or None).
    A query row that sees no key gives out = 0 and lse = -inf.
    """
    if plan.q_lens is not None and use_triton(q):
        from batonserve.kernels.triton.prefill_attention import prefill_attention_triton

        return prefill_attention_triton(q, k, v, plan, scale=scale, return_lse=return_lse)
    if plan.row_seq is not None and k.dim() == 4 and _cpu_kernel_ok(q, k, plan.num_rows):
        assert plan.block_tables is not None and plan.row_last is not None
        rows = plan.q_index[plan.q_valid]  # [num_rows] q row of each output row
        return paged_attention_cpu(
            q.index_select(0, rows),
            k,
            v,
            plan.block_tables,
            plan.row_seq,
            plan.row_last,
            scale=scale,
            sliding_window=plan.sliding_window,
            return_lse=return_lse,
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_flat = k.reshape(-1, num_kv, head_dim)  # a paged cache becomes [num_slots, kv_heads, d]
    v_flat = v.reshape(-1, num_kv, head_dim)
    if not return_lse and _plain_causal(q, plan):
        return _causal_per_sequence(q, k_flat, v_flat, plan, scale), None
    qp = q[plan.q_index].transpose(1, 2)  # [B, H, max_q, d]
    kp = k_flat[plan.k_index].transpose(1, 2)  # [B, Hkv, max_k, d]
    vp = v_flat[plan.k_index].transpose(1, 2)
    lse_out: torch.Tensor | None = None
    if return_lse:
        b, _, max_q, _ = qp.shape
        group = num_heads // num_kv
        qg = qp.float().reshape(b, num_kv, group * max_q, head_dim)
        s = torch.matmul(qg, kp.float().transpose(-1, -2)) * scale  # [B, Hkv, G*max_q, max_k]
        s = s.view(b, num_heads, max_q, -1).masked_fill(~plan.mask, NEG_INF)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [B, H, max_q, 1]
        p = torch.exp(s - lse).view(b, num_kv, group * max_q, -1)
        out = torch.matmul(p, vp.float()).view(b, num_heads, max_q, head_dim).to(q.dtype)
        lse = lse.masked_fill(~plan.has_key, NEG_INF)
        lse_out = lse[..., 0].transpose(1, 2)[plan.q_valid]  # [num_tokens, H]
    else:
        out = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=plan.mask, scale=scale, enable_gqa=num_kv != num_heads
        )
    if not plan.all_have_keys:
        out = out.masked_fill(~plan.has_key, 0.0)
    return out.transpose(1, 2)[plan.q_valid], lse_out


def _plain_causal(q: torch.Tensor, plan: PrefillPlan) -> bool:
    """CPU plain prompts (queries = keys, from position 0), no window cutting in: causal SDPA
    per sequence needs no mask, so it skips the padding and the blocks above the diagonal."""
    if q.device.type != "cpu" or not plan.causal or plan.q_lens is None or plan.k_lens is None:
        return False
    if not torch.equal(plan.q_lens, plan.k_lens):
        return False
    window = plan.sliding_window
    return window is None or window >= int(plan.k_lens.max())


def _causal_per_sequence(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, plan: PrefillPlan, scale: float
) -> torch.Tensor:
    """prefill_attention for `_plain_causal` plans: one SDPA(is_causal) per sequence."""
    assert plan.q_lens is not None
    gqa = k_flat.shape[1] != q.shape[1]
    outs = []
    for b, n in enumerate(plan.q_lens.tolist()):
        if n == 0:
            continue
        qb = q[plan.q_index[b, :n]].transpose(0, 1)[None]  # [1, H, n, d]
        keys = plan.k_index[b, :n]
        kb = k_flat[keys].transpose(0, 1)[None]
        vb = v_flat[keys].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q_lens: torch.Tensor,
    cu_k_lens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plan and run prefill attention with flat varlen keys k/v [total_k, kv_heads, d]."""
    plan = plan_prefill(
        cu_q_lens,
        _lens(cu_k_lens),
        k_starts=cu_k_lens[:-1],
        causal=causal,
        sliding_window=sliding_window,
    )
    return prefill_attention(q, k, v, plan, scale=scale, return_lse=return_lse)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plan and run prefill attention whose keys (cached prefix + new) live in a paged cache."""
    plan = plan_prefill(
        cu_q_lens,
        context_lens,
        block_tables=block_tables,
        block_size=k_cache.shape[1],
        sliding_window=sliding_window,
    )
    return prefill_attention(q, k_cache, v_cache, plan, scale=scale, return_lse=return_lse)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets by log-sum-exp.

    out_* [..., H, d], lse_* [..., H] float32. Rows where both lse are -inf (no key seen) give
    out = 0 and lse = -inf, never NaN. Computed in float32; out keeps out_a's dtype.
    """
    outs = torch.stack([out_a, out_b])
    lses = torch.stack([lse_a.float(), lse_b.float()])
    return merge_attention_states_many(outs, lses)


def merge_attention_states_many(
    outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partials: outs [S, ..., H, d], lses [S, ..., H] -> (out [..., H, d], lse [..., H])."""
    if use_triton(outs):
        from batonserve.kernels.triton.merge import merge_attention_states_many_triton

        return merge_attention_states_many_triton(outs, lses)
    lses = lses.float()
    m = lses.amax(dim=0)  # [..., H]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # -inf rows: avoid inf - inf
    w = torch.exp(lses - m_safe)  # [S, ..., H], exactly 0 for -inf partials
    total = w.sum(dim=0)
    lse = m_safe + torch.log(total)  # log(0) = -inf for rows with no key
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    out = (outs.float() * w[..., None]).sum(dim=0)
    return out.to(outs.dtype), lse


@dataclass(frozen=True)
class DecodePlan:
    """Per-batch layout of a paged decode: each sequence's context cut into num_splits equal chunks."""

    block_ids: torch.Tensor  # [B * num_splits * blocks_per_split] int64, the gathered blocks
    valid: torch.Tensor  # [B, 1, S, 1, split_len] bool, position is inside the (windowed) context
    num_splits: int
    split_len: int
    context_lens: torch.Tensor | None = None  # [B] int64, for fast paths masking from lengths
    sliding_window: int | None = None
    block_tables: torch.Tensor | None = None  # [B, max_blocks], for kernels reading blocks in place


def _cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def default_num_splits(max_context_len: int, block_size: int) -> int:
    """Splits for decode: about one per 256 context tokens, at most 8 (the merge is cheap)."""
    return max(1, min(8, _cdiv(max_context_len, 256), _cdiv(max_context_len, block_size)))


def plan_decode(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    *,
    num_splits: int | None = None,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
) -> DecodePlan:
    """Build the split-K layout of `paged_decode_attention` (one query per sequence, at its last key)."""
    device = block_tables.device
    lens = context_lens.to(device=device, dtype=torch.long)  # [B]
    max_len = int(lens.max()) if max_context_len is None else max_context_len
    splits = num_splits or default_num_splits(max_len, block_size)
    # Each split covers a whole number of blocks, so the gather is of whole blocks.
    blocks_per_split = max(1, _cdiv(_cdiv(max_len, block_size), splits))
    split_len = blocks_per_split * block_size
    nblk = blocks_per_split * splits
    bt = block_tables.long()
    if bt.shape[1] < nblk:
        bt = F.pad(bt, (0, nblk - bt.shape[1]))  # block 0 stands in; its positions are masked
    pos = torch.arange(nblk * block_size, device=device)  # [L]
    valid = pos[None, :] < lens[:, None]  # [B, L]
    if sliding_window is not None:
        valid = valid & (pos[None, :] > lens[:, None] - 1 - sliding_window)
    valid = valid.view(-1, 1, splits, 1, split_len)
    return DecodePlan(
        bt[:, :nblk].reshape(-1), valid, splits, split_len, lens, sliding_window, block_tables
    )


def _gather_heads_major(cache: torch.Tensor, plan: DecodePlan, batch: int) -> torch.Tensor:
    """Whole blocks of each sequence as [B, Hkv, S, split_len, d] (contiguous, for batched matmul)."""
    blocks = cache.index_select(0, plan.block_ids)  # [B * nblk, bs, Hkv, d]
    hkv, d = cache.shape[-2], cache.shape[-1]
    per_seq = blocks.view(batch, plan.num_splits, plan.split_len, hkv, d)
    return per_seq.permute(0, 3, 1, 2, 4).contiguous()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodePlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paged decode attention, split-K: partial (out, lse) per split, then one LSE merge.

    q [B, H, d] (one query per sequence); caches [num_blocks, block_size, Hkv, d].
    Returns (out [B, H, d], lse [B, H] float32 or None).
    """
    if plan.context_lens is not None and use_triton(q):
        from batonserve.kernels.triton.decode_attention import decode_attention_triton

        return decode_attention_triton(
            q, k_cache, v_cache, plan, scale=scale, return_lse=return_lse
        )
    if plan.block_tables is not None and _cpu_kernel_ok(q, k_cache, q.shape[0]):
        assert plan.context_lens is not None
        b = q.shape[0]
        return paged_attention_cpu(
            q,
            k_cache,
            v_cache,
            plan.block_tables,
            torch.arange(b),
            plan.context_lens - 1,  # one query per sequence, at its last key
            scale=scale,
            sliding_window=plan.sliding_window,
            return_lse=return_lse,
        )
    b, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[-2]
    group = num_heads // num_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k = _gather_heads_major(k_cache, plan, b)  # [B, Hkv, S, Ls, d]
    v = _gather_heads_major(v_cache, plan, b)
    qg = q.view(b, num_kv, 1, group, head_dim)  # broadcast over the S splits
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, S, G, Ls]
    s = s.masked_fill(~plan.valid, NEG_INF)
    m = s.amax(dim=-1, keepdim=True)  # [B, Hkv, S, G, 1]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe)  # masked entries exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)  # [B, Hkv, S, G, 1]
    part = torch.matmul(p.to(v.dtype), v).float()  # [B, Hkv, S, G, d], unnormalised partials
    part = part / torch.where(denom > 0, denom, 1.0)
    lse_s = (m_safe + torch.log(denom))[..., 0]  # [B, Hkv, S, G], -inf for empty splits
    if plan.num_splits == 1:
        out, lse = part[:, :, 0], lse_s[:, :, 0]
    else:
        out, lse = merge_attention_states_many(part.movedim(2, 0), lse_s.movedim(2, 0))
    out = out.reshape(b, num_heads, head_dim).to(q.dtype)
    return out, (lse.reshape(b, num_heads) if return_lse else None)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    num_splits: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plan and run split-K paged decode attention (see `decode_attention`)."""
    plan = plan_decode(
        block_tables,
        context_lens,
        k_cache.shape[1],
        num_splits=num_splits,
        sliding_window=sliding_window,
    )
    return decode_attention(q, k_cache, v_cache, plan, scale=scale, return_lse=return_lse)
