"""Build the carry folder bench/gpu-setup.sh installs on an offline GPU machine: wheels for Python 3.12 of what
the pipeline and llm-compressor need and that machine's image does not ship.

What the image ships is a list of package names (the device library's KINDS.md, "Packages: ..."); what is needed
is the closure of this project's requirements as installed in .venv, at the versions installed there. Packages
without a wheel for the target (an sdist only, pure Python) are built into wheels here.

    python bench/gpu_carry.py --image-packages FILE [--out .gpu-carry] [--list]
    python bench/gpu_carry.py --image-packages FILE --pools --out .gpu-carry-pools
    python bench/gpu_carry.py --image-packages FILE --warm-pool --out .gpu-carry-warm
    python bench/gpu_carry.py --image-packages FILE --matrix --out .gpu-carry-matrix

FILE holds the image's package names, comma- or line-separated. --list prints what would be carried and stops.
--pools carries what the worker-pools benchmarks need instead (bench/pools_load.py, bench/gpu_pools.py): moto for
the S3 endpoint, no llm-compressor, botocore with the S3 and STS models only, and the pinned llama.cpp tree (.llama.cpp, scripts/build-llama-cpp.sh) as
llama-src.txz without what a CPU build never reads (other backends, models, docs, tests), so that everything fits
the device tool's 64 MiB. --warm-pool carries what bench/gpu_warm_pool.py needs: llm-compressor and moto, botocore
slimmed as for --pools, no llama.cpp. --matrix carries what bench/gpu_matrix.py needs: the pipeline and
llm-compressor, botocore slimmed, and the llama.cpp tree with its CUDA backend.

Where llama.cpp's tree is carried, the llama_cpp bindings' Python files (and diskcache, which they import) are
copied from this environment into site/, without their library: gpu-setup.sh builds that from the tree.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

# What the pipeline and the calibrated-quantizer benchmark import on the GPU machine (llama.cpp is optional there).
ROOTS = ("prefect", "fastapi", "sqlalchemy", "hydra-core", "omegaconf", "boto3", "securesystemslib", "cryptography",
         "rich", "llmcompressor", "compressed-tensors", "datasets", "sentencepiece", "protobuf")
SERVER_ROOTS = ("moto", "flask", "flask-cors")  # moto[server]
POOLS_ROOTS = (*(r for r in ROOTS if r not in ("llmcompressor", "compressed-tensors", "datasets")), *SERVER_ROOTS)
LLAMA_BUILD = Path(__file__).resolve().parent.parent / ".llama.cpp"  # scripts/build-llama-cpp.sh writes it
LLAMA_TREE = LLAMA_BUILD / "src" / "vendor" / "llama.cpp"
LLAMA_SKIPPED = ("models", "docs", "benches", "media", "tests", "examples", "pocs", "tools/server/public",
                 "tools/server/webui", *(f"ggml/src/ggml-{b}" for b in (
                     "cuda", "vulkan", "sycl", "metal", "opencl", "cann", "musa", "hip", "webgpu", "hexagon", "et",
                     "openvino", "virtgpu", "zdnn", "zendnn")))
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(have: set[str], roots: tuple[str, ...] = ROOTS) -> list[str]:
    """``name==version`` of every installed requirement of ROOTS (recursively) that ``have`` lacks."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    out: list[str] = []

    def walk(name: str) -> None:
        n = _norm(name)
        if n in seen:
            return
        seen.add(n)
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            return
        if n not in have:  # asyncpg too: Prefect's server imports it even on SQLite
            out.append(f"{n}=={dist.version}")
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                walk(req.name)

    for root in roots:
        walk(root)
    return sorted(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-packages", required=True, type=Path)
    parser.add_argument("--out", default=".gpu-carry", type=Path)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--pools", action="store_true")
    parser.add_argument("--warm-pool", action="store_true")
    parser.add_argument("--matrix", action="store_true")
    args = parser.parse_args()
    have = {_norm(n.strip()) for n in re.split(r"[,\n]", args.image_packages.read_text()) if n.strip()}
    wanted = needed(have, POOLS_ROOTS if args.pools else (*ROOTS, *SERVER_ROOTS) if args.warm_pool else ROOTS)
    if args.list:
        print("\n".join(wanted))
        return 0
    wheels = args.out / "whl"
    wheels.mkdir(parents=True, exist_ok=True)
    platform = [a for p in PLATFORMS for a in ("--platform", p)]
    for spec in wanted:
        binary = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                 "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", *platform,
                                 "-d", str(wheels), spec], capture_output=True, text=True)
        if binary.returncode != 0:  # no wheel for the target: build one (pure-Python sdists)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), spec],
                           check=True)
    size = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"{len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {wheels}")
    if args.pools or args.warm_pool or args.matrix:
        for wheel in wheels.glob("botocore-*.whl"):
            slim_botocore(wheel)
    if args.pools or args.matrix:
        llama_tree(args.out, cuda=args.matrix)
        bindings(args.out / "site")
    return 0


def slim_botocore(wheel: Path, services: tuple[str, ...] = ("s3", "sts")) -> None:
    """Rewrite botocore's wheel with the service models of ``services`` only (16 MiB of its 16.5 are the models
    of every AWS service; the pools benchmarks talk to S3 alone)."""
    import zipfile

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            parts = info.filename.split("/")
            if parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in services:
                continue
            zout.writestr(info, zin.read(info.filename))
    slim.replace(wheel)


def llama_tree(out: Path, *, cuda: bool = False) -> None:
    """The pinned llama.cpp tree as llama-src.txz (with ggml-cuda if ``cuda``), and its BUILD_INFO.json, for
    gpu-setup.sh to build."""
    import shutil
    import tarfile

    if not LLAMA_TREE.is_dir():
        sys.exit(f"no llama.cpp tree at {LLAMA_TREE}: run `make setup` first (scripts/build-llama-cpp.sh)")
    skipped = {f"llama.cpp/{s}" for s in LLAMA_SKIPPED if not (cuda and s == "ggml/src/ggml-cuda")}
    out.mkdir(parents=True, exist_ok=True)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name
        return None if any(name == s or name.startswith(s + "/") for s in skipped) or "/.git" in name else info

    with tarfile.open(out / "llama-src.txz", "w:xz") as tar:
        tar.add(LLAMA_TREE, arcname="llama.cpp", filter=keep)
    shutil.copyfile(LLAMA_BUILD / "BUILD_INFO.json", out / "BUILD_INFO.json")
    print(f"llama.cpp tree: {(out / 'llama-src.txz').stat().st_size / 2**20:.1f} MiB in {out / 'llama-src.txz'}")


def bindings(site: Path) -> None:
    """The llama_cpp package's Python files and diskcache, as installed here, without compiled libraries."""
    import shutil

    for name in ("llama_cpp", "diskcache"):
        src = Path(md.distribution("llama-cpp-python" if name == "llama_cpp" else name).locate_file(name))
        shutil.rmtree(site / name, ignore_errors=True)
        shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("lib", "__pycache__", "*.so", "*.so.*"))
    print(f"llama_cpp bindings: {sum(p.stat().st_size for p in site.rglob('*') if p.is_file()) / 2**20:.1f} MiB "
          f"in {site}")


if __name__ == "__main__":
    sys.exit(main())
