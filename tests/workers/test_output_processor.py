"""Output processor: incremental detokenization (UTF-8 safe) and stop strings across tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from batonserve.workers.output_processor import OutputProcessor, StopStringMatcher, stop_holdback
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import IncrementalDetokenizer, Tokenizer

EOS = 1


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_json)


def _co(
    rid: str, tokens: list[int], n_out: int, finished: bool = False, reason: str | None = None
) -> CoreOutput:
    return CoreOutput(rid, tuple(tokens), (), finished, reason, False, 3, n_out, 0)


def _stream(
    proc: OutputProcessor, rid: str, ids: list[int], last_reason: str = "length"
) -> list[tuple[str, bool, str | None]]:
    out = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        step = proc.process([_co(rid, [t], i + 1, last, last_reason if last else None)])
        out += [(o.text, o.finished, o.finish_reason) for o in step.outputs]
        if step.outputs and step.outputs[-1].finished:
            break
    return out


def test_incremental_detokenization_never_splits_a_character(tok: Tokenizer) -> None:
    text = "héllo wörld: 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # byte-level: multi-byte characters span several tokens
    prompt = tok.encode("say: ")
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    assert "" in pieces  # some tokens completed no character on their own


def test_stop_string_across_token_boundaries_is_cut_and_held_back(tok: Tokenizer) -> None:
    proc = OutputProcessor(tok, (EOS,))
    text = "The quick brown fox jumps"
    ids = tok.encode(text)
    proc.add_request("r", tok.encode("go:"), SamplingParams(stop=["brown f", "zzz"]))
    outs = _stream(proc, "r", ids)
    emitted = "".join(t for t, _, _ in outs)
    assert emitted == "The quick "
    assert outs[-1][1:] == (True, "stop")
    # Held back: while "bro" had arrived, nothing past "The quick " was released.
    running = ""
    for t, _, _ in outs:
        running += t
        assert "b" not in running
    assert "r" not in proc


def test_stop_string_reported_for_core_abort_and_eos_has_no_text(tok: Tokenizer) -> None:
    proc = OutputProcessor(tok, (EOS,))
    ids = tok.encode("print(total)")
    proc.add_request("a", [0], SamplingParams(stop=["total"]))
    step = None
    for i, t in enumerate(ids):
        step = proc.process([_co("a", [t], i + 1)])
        if step.stopped:
            break
    assert step is not None and step.stopped == ["a"]
    proc.add_request("b", [0], SamplingParams())
    outs = _stream(proc, "b", [*tok.encode("hi"), EOS], last_reason="stop")
    assert "".join(t for t, _, _ in outs) == "hi" and outs[-1][2] == "stop"


def test_matcher_and_holdback_helpers() -> None:
    assert stop_holdback("abc", ["cde"]) == 1
    assert stop_holdback("abcd", ["bcdx", "d"]) == 3
    assert stop_holdback("abc", ["xyz"]) == 0
    m = StopStringMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.feed("N") == ""
    assert m.feed("X more") == "ENX more"
    m2 = StopStringMatcher(["END"])
    assert m2.feed("aE") == "a" and m2.feed("ND tail") == "" and m2.stopped and m2.text == "a"


def test_stop_strings_need_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="stop"):
        OutputProcessor(None).add_request("x", [1], SamplingParams(stop=["a"]))
