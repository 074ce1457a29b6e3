"""Regenerates the committed Python stubs from the .proto files (python -m batonserve.proto.codegen).

protoc names generated imports after the include path, so the sources are staged under
batonserve/proto/ in a scratch tree: the stubs then import each other as `batonserve.proto.*`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("generation.proto", "kserve_v2.proto")


def generated_names() -> list[str]:
    """File names that generate() writes, for every .proto in PROTO_FILES."""
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run grpcio-tools' protoc on PROTO_FILES and write the stubs into out_dir."""
    from grpc_tools import protoc  # test-only dependency: imported here, not at module load

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "batonserve" / "proto"
        stage.mkdir(parents=True)
        for proto in PROTO_FILES:
            shutil.copy(PROTO_DIR / proto, stage / proto)
        well_known = resources.files("grpc_tools") / "_proto"
        args = [
            "protoc",
            f"-I{tmp}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"batonserve/proto/{p}" for p in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in generated_names():
            shutil.copy(stage / name, out_dir / name)
            written.append(out_dir / name)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
