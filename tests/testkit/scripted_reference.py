"""What an undisturbed run of the scripted engine gives: the reference for live scripted clusters."""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngine, ScriptedEngineConfig


def scripted_reference(
    cfg: ScriptedEngineConfig, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> list[list[int]]:
    """Each prompt's tokens, run alone on one in-process scripted engine (no handoff, no fault)."""
    engine = ScriptedEngine(cfg)
    outs: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        rid = f"ref-{i}"
        engine.add_request(rid, list(prompt), params)
        toks: list[int] = []
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid:
                    toks += o.new_token_ids
        outs.append(toks)
    return outs
