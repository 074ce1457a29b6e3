"""Splitwise's machine-level batching rule, for paper-faithful simulations.

The paper's simulator (SplitwiseSim's `SplitwiseInstance.select_batch`) never chunks a prompt:
each step first takes whole waiting prompts in arrival order while the batch stays within the
token budget (2048; a prompt alone may exceed it), then one token for each running request
while budget and batch size (512) allow. Prompts therefore pre-empt decodes on a colocated
machine, where batonserve's engine runs decodes first and fills the rest with prompt chunks.

Only `schedule()` differs from the engine's scheduler: requests, blocks, updates, handoffs and
preemption by recompute (when a decode cannot grow) are the engine's own.
"""

from __future__ import annotations

from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.scheduler import ScheduledSeq, Scheduler, StepPlan


class SplitwiseBatching(Scheduler):
    """The engine's scheduler with Splitwise's batch selection; `max_num_seqs` caps a batch."""

    def schedule(self) -> StepPlan:
        """Whole prompts first (FCFS, within the token budget), then one token per decode."""
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        used = 0
        taken: set[str] = set()
        while self.waiting and len(seqs) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_tokens  # a waiting request computes everything (preemption recomputes)
            if seqs and used + n > budget:
                break
            if self._blocks_for(n) > self.pool.num_blocks:
                self.waiting.popleft()  # can never fit, as the engine does
                self._finish(req, "length")
                self._pending.append(self._update(req, ()))
                continue
            blocks = self.pool.allocate(self._blocks_for(n))
            if blocks is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.block_ids = blocks
            req.num_computed_tokens = 0
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = 0
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            taken.add(req.request_id)
            used += n
        bs = self.block_size
        for req in list(self.running):
            if len(seqs) >= self.max_num_seqs or used >= budget:
                break
            if req.request_id in taken or req.status is not RequestStatus.RUNNING:
                continue  # just admitted, or pre-empted below to make room
            target = len(req.prompt_token_ids) + len(req.output_token_ids)
            # Most decode steps stay inside the last block: no need to grow (or pre-empt).
            if len(req.block_ids) * bs < target and not self._grow_or_preempt(
                req, taken, preempted
            ):
                continue
            n = target - req.num_computed_tokens
            seqs.append(self._seq(req, n))
            taken.add(req.request_id)
            used += n
        self._last_batched = used
        self._step += 1
        return StepPlan(tuple(seqs), tuple(preempted), used)

    def _grow_or_preempt(self, req: Request, taken: set[str], preempted: list[str]) -> bool:
        """Blocks for req's next token, pre-empting the latest unscheduled requests if needed."""
        target = req.num_tokens
        while not self._grow(req, target):
            victims = [r for r in self.running if r.request_id not in taken]
            victim = victims[-1]  # req itself is among them: it was not taken yet
            self.running.remove(victim)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True
