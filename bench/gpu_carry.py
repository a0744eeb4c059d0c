"""Build the carry folder bench/gpu-setup.sh installs on an offline GPU machine: wheels for Python 3.12 of what
the pipeline and llm-compressor need and that machine's image does not ship.

What the image ships is a list of package names (the device library's KINDS.md, "Packages: ..."); what is needed
is the closure of this project's requirements as installed in .venv, at the versions installed there. Packages
without a wheel for the target (an sdist only, pure Python) are built into wheels here.

    python bench/gpu_carry.py --image-packages FILE [--out .gpu-carry] [--list]

FILE holds the image's package names, comma- or line-separated. --list prints what would be carried and stops.
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
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(have: set[str]) -> list[str]:
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

    for root in ROOTS:
        walk(root)
    return sorted(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-packages", required=True, type=Path)
    parser.add_argument("--out", default=".gpu-carry", type=Path)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    have = {_norm(n.strip()) for n in re.split(r"[,\n]", args.image_packages.read_text()) if n.strip()}
    wanted = needed(have)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
