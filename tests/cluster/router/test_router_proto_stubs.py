"""The committed stubs are exactly what grpcio-tools (pinned in the test extra) generates."""

from __future__ import annotations

from pathlib import Path

from batonserve.proto import codegen


def test_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(codegen.generated_names())
    stale = [p.name for p in written if p.read_bytes() != (codegen.PROTO_DIR / p.name).read_bytes()]
    assert not stale, f"run `python -m batonserve.proto.codegen` and commit: {stale}"
    committed = {p.name for p in codegen.PROTO_DIR.glob("*_pb2*.py*")}
    assert committed == set(codegen.generated_names())


def test_kserve_wire_names() -> None:
    """Package, service and field numbers a v2 client relies on."""
    from batonserve.proto import kserve_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    req = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert (req["inputs"].number, req["raw_input_contents"].number) == (5, 7)
    resp = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert (resp["outputs"].number, resp["raw_output_contents"].number) == (5, 6)
    assert pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number == 2
    assert pb.InferTensorContents.DESCRIPTOR.fields_by_name["bytes_contents"].number == 8
