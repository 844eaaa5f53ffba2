"""Regenerate engram_pb2*.py from engram.proto with the pinned grpcio-tools.

Usage: python engram/proto/generate.py [OUT_DIR]"""

import re
import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(HERE / "engram.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out / "engram_pb2_grpc.py"
    # protoc writes a top-level import; the stubs live in the engram.proto package.
    grpc_file.write_text(
        re.sub(r"^import engram_pb2 as", "from . import engram_pb2 as", grpc_file.read_text(), flags=re.MULTILINE)
    )


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
