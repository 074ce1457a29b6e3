"""KServe v2 tensors <-> Python values: raw little-endian bytes or typed contents.

Only what a text-generation model needs: one-element tensors (a prompt, a few scalars) in, and
BYTES tensors out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from batonserve.cluster.router.errors import invalid
from batonserve.proto import kserve_v2_pb2 as pb

Scalar = bool | int | float | bytes

# KServe datatype -> numpy dtype of its raw little-endian encoding.
_RAW_DTYPES = {
    "BOOL": np.dtype("?"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# KServe datatype -> the InferTensorContents field that carries it.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def split_bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """Decode the raw BYTES layout: each element is a 4-byte little-endian length + data."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise invalid(name, "raw BYTES data is truncated")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise invalid(name, "raw BYTES data is truncated")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def join_bytes_elements(items: Sequence[bytes]) -> bytes:
    """The raw BYTES layout of `items`."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def tensor_elements(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> list[Scalar]:
    """All elements of an input tensor, from its raw bytes when given, else from contents."""
    name, dtype = tensor.name, tensor.datatype
    if dtype == "BYTES":
        items = (
            split_bytes_elements(raw, name)
            if raw is not None
            else list(tensor.contents.bytes_contents)
        )
        return list(items)
    if raw is not None:
        np_dtype = _RAW_DTYPES.get(dtype)
        if np_dtype is None:
            raise invalid(name, f"datatype {dtype!r} is not supported")
        if len(raw) % np_dtype.itemsize:
            raise invalid(name, f"raw data of {len(raw)} bytes is not a whole number of {dtype}")
        return [v.item() for v in np.frombuffer(raw, dtype=np_dtype)]
    field = _CONTENTS_FIELD.get(dtype)
    if field is None:
        raise invalid(name, f"datatype {dtype!r} is not supported")
    return list(getattr(tensor.contents, field))


def single_element(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Scalar:
    """The one element of a tensor that must hold exactly one (batching is not supported)."""
    values = tensor_elements(tensor, raw)
    if len(values) != 1:
        raise invalid(tensor.name, f"expected exactly one element, got {len(values)}")
    return values[0]


def parameter_value(param: pb.InferParameter) -> Scalar | str | None:
    """The value held by an InferParameter, or None when none is set."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def bytes_output(
    name: str, items: Sequence[bytes]
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A BYTES output tensor of shape [len(items)] and its raw contents."""
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype="BYTES", shape=[len(items)]
    )
    return tensor, join_bytes_elements(items)
