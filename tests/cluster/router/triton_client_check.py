"""Run by test_router_kserve.py in .tools/triton-venv: an unmodified tritonclient talks to us.

Usage: python triton_client_check.py HOST:PORT MODEL PROMPT. Prints one JSON object of results.
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _text_input(prompt: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return inp


def _scalar(name: str, value: object, dtype: str, np_dtype: type) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, [1], dtype)
    inp.set_data_from_numpy(np.array([value], dtype=np_dtype))
    return inp


def _error(fn: object) -> str:
    try:
        fn()  # type: ignore[operator]
    except InferenceServerException as e:
        return str(e.status())
    return "no error"


def main(target: str, model: str, prompt: str) -> dict[str, object]:
    client = grpcclient.InferenceServerClient(url=target)
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "other_model_ready": client.is_model_ready("nope"),
        "server_name": client.get_server_metadata().name,
        "inputs": [i.name for i in client.get_model_metadata(model).inputs],
        "metadata_unknown": _error(lambda: client.get_model_metadata("nope")),
        "config_unimplemented": _error(lambda: client.get_model_config(model)),
    }
    # Non-streaming: max_tokens as an input tensor.
    result = client.infer(
        model,
        [_text_input(prompt), _scalar("max_tokens", 12, "INT32", np.int32)],
        request_id="unary-1",
    )
    out["infer_text"] = result.as_numpy("text_output")[0].decode()
    out["infer_finish"] = result.as_numpy("finish_reason")[0].decode()
    out["infer_id"] = result.get_response().id

    # Streaming: stream=True as an input, temperature as a request parameter.
    responses: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(
        model,
        [_text_input(prompt), _scalar("stream", True, "BOOL", bool)],
        request_id="stream-1",
        parameters={"max_tokens": 8, "temperature": 0.0},
        enable_empty_final_response=True,
    )
    pieces, finals = [], []
    while True:
        result, error = responses.get(timeout=20)
        if error is not None:
            raise RuntimeError(str(error))
        resp = result.get_response()  # type: ignore[attr-defined]
        final = resp.parameters["triton_final_response"].bool_param
        finals.append(final)
        text = result.as_numpy("text_output")  # type: ignore[attr-defined]
        if text is not None:
            pieces.append(text[0].decode())
        if final:
            break
    # An error travels in-band and the stream stays usable.
    client.async_stream_infer(model, [_text_input("")], request_id="bad-1")
    _, error = responses.get(timeout=20)
    out["stream_error"] = str(error)
    client.stop_stream()
    out["stream_pieces"] = pieces
    out["stream_finals"] = finals
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
