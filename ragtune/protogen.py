"""Generates the Python gRPC stubs in ragtune/v1/ from protos/ragtune/v1/*.proto.

Run `python -m ragtune.protogen` after changing a .proto; the generated files are
git-ignored and made at setup. `generate(out_dir)` is also used by the stub-sync test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = sorted((PROTO_ROOT / "ragtune" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) for every ragtune .proto into out_dir; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    pkg = out_dir / "ragtune" / "v1"
    (pkg / "__init__.py").write_text('"""Stubs generated from protos/ragtune/v1 by `python -m ragtune.protogen`."""\n')
    return sorted(pkg.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    written = generate(args.out)
    print(f"generated {len(written)} files in {args.out / 'ragtune' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
