"""The native Generate stream over a real socket against the fake cluster."""

from __future__ import annotations

from testkit.router_harness import REPLY, RouterHarness

from batonserve.proto import generation_pb2 as pb
from batonserve.workers.tokenizer import Tokenizer


def _collect(stream: object) -> tuple[list[int], str, list[pb.GenerateResponse]]:
    msgs = list(stream)  # type: ignore[call-overload]
    ids = [t for m in msgs for t in m.token_ids]
    return ids, "".join(m.text for m in msgs), msgs


def test_stream_equals_script(router: RouterHarness, tokenizer: Tokenizer) -> None:
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    req = pb.GenerateRequest(
        request_id="r1", text="Hello world", sampling=pb.SamplingParams(max_tokens=50)
    )
    ids, text, msgs = _collect(router.stub().Generate(req, timeout=10))
    assert ids == script
    assert text == REPLY  # multi-byte characters (¡, é, 🙂) arrive whole
    assert len(msgs) >= len(script)  # streamed token by token, not in one piece
    assert all(m.request_id == "r1" for m in msgs)
    last = msgs[-1]
    assert [m.HasField("finish_reason") for m in msgs].count(True) == 1
    assert last.finish_reason == "stop"
    assert last.usage.prompt_tokens == len(tokenizer.encode("Hello world"))
    assert last.usage.completion_tokens == len(script)
    # The router tokenized the prompt with the model's tokenizer (BOS included).
    sent = router.cluster.requests[-1]
    assert list(sent.prompt_token_ids) == tokenizer.encode("Hello world")
    assert sent.prompt_token_ids[0] == 0


def test_max_tokens_and_unset_vs_zero(router: RouterHarness) -> None:
    stub = router.stub()
    req = pb.GenerateRequest(
        text="Hi", sampling=pb.SamplingParams(max_tokens=5, temperature=0.0, seed=7)
    )
    ids, _, msgs = _collect(stub.Generate(req, timeout=10))
    assert len(ids) == 5 and msgs[-1].finish_reason == "length"
    sp = router.cluster.requests[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.seed) == (5, 0.0, 7)  # explicit zero kept
    _collect(stub.Generate(pb.GenerateRequest(text="Hi"), timeout=10))
    sp = router.cluster.requests[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.seed) == (16, 1.0, None)  # unset -> defaults
    assert router.cluster.requests[-1].request_id  # the server made an id


def test_token_ids_input_stop_ids_and_cache(router: RouterHarness, tokenizer: Tokenizer) -> None:
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    stub = router.stub()
    prompt = [0, 5, 6, 7, 8, 9, 10, 11, 12]
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=40, stop_token_ids=[script[3]]),
    )
    ids, _, msgs = _collect(stub.Generate(req, timeout=10))
    assert ids == script[: script.index(script[3]) + 1]
    assert msgs[-1].finish_reason == "stop"
    assert list(router.cluster.requests[-1].prompt_token_ids) == prompt
    assert msgs[-1].usage.cached_tokens == 0
    _, _, again = _collect(stub.Generate(req, timeout=10))
    assert again[-1].usage.cached_tokens == 8  # two full 4-token blocks hit the prefix cache
    assert router.cluster.used_blocks == 0


def test_model_and_server_info(router: RouterHarness) -> None:
    stub = router.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (info.name, info.architecture, info.context_length) == ("tiny", "LlamaForCausalLM", 64)
    assert info.vocab_size == router.cluster.info.vocab_size and not info.is_moe
    server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert list(server.pools) == ["prefill", "decode"]
    assert [(w.name, w.role, w.healthy) for w in server.workers] == [
        ("prefill-0", "prefill", True),
        ("decode-0", "decode", True),
    ]
    assert server.model == "tiny" and server.version == "test"


def test_model_name_matches(router: RouterHarness) -> None:
    req = pb.GenerateRequest(model="tiny", text="Hi", sampling=pb.SamplingParams(max_tokens=2))
    ids, _, _ = _collect(router.stub().Generate(req, timeout=10))
    assert len(ids) == 2
