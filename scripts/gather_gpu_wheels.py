"""Gather the wheels scripts/gpu_check.sh installs on a GPU machine that cannot reach the package index.

The GPU machine brings its own CUDA torch; this collects trl, datasets, bitsandbytes, deepspeed and liger-kernel
(plus finetune's own dependencies and everything they pull in) at exactly the versions installed in this
environment (the lock, constraints.txt), for the GPU machine's Python versions. Dependencies are read from the
installed packages' metadata, so the set is the one tested here; torch, triton and NVIDIA's CUDA libraries are
left out (they come with the GPU machine's torch). Packages with only an sdist (deepspeed) are built into a wheel
here (`pip wheel`, pure Python). Writes DIR/requirements.txt (name==version lines) for gpu_check.sh.

Usage (where PyPI is reachable):
    python scripts/gather_gpu_wheels.py [--dir shared/wheels] [--python 3.11 3.12] [--cuda 130 132]
The directory's size is printed: a carried tree has a size limit (64 MiB on this project's lent machines),
so the wheels the GPU machine already has at the same version can be left out with --skip NAME, and
bitsandbytes' wheel keeps only the CUDA builds named by --cuda (its other CUDA and ROCm libraries are 120 of
its 129 MiB; it loads the one matching torch.version.cuda). Measured 2026-11-29 for the nvidia-h200 machine
(Python 3.12, torch cu13; --skip what its image holds, see the device tool's KINDS.md): 64 MiB of wheels
without pruning, 29 MiB with --cuda 130 132 (the repository adds ~2 MiB).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WANTED = ["trl", "datasets", "bitsandbytes", "deepspeed", "liger-kernel", "peft", "accelerate", "transformers",
          "typer", "pydantic", "omegaconf", "rich", "pyyaml", "safetensors", "tokenizers"]
# Not installed here (GPU-only): pinned by hand. liger-kernel is pure Python; it needs only torch and triton.
NOT_INSTALLED = {"liger-kernel": "0.8.5"}
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|pip|wheel)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str], skip: set[str]) -> dict[str, str]:
    """name -> installed version for `names` and everything they require (environment markers evaluated here)."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or LEFT_OUT.match(name) or name in skip:
            continue
        if name in NOT_INSTALLED:
            found[name] = NOT_INSTALLED[name]
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            print(f"  {name}: not installed here, left out", file=sys.stderr)
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return found


def prune_gpu_libraries(wheel: Path, keep: set[str]) -> None:
    """Rewrite bitsandbytes' wheel without the CUDA/ROCm libraries of other versions (and their RECORD lines)."""
    import zipfile

    library = re.compile(r"libbitsandbytes_(cuda|rocm)(\d+)\.so$")

    def kept(name: str) -> bool:
        found = library.search(name)
        return found is None or (found.group(1) == "cuda" and found.group(2) in keep)

    pruned = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if not kept(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if kept(line.split(",")[0])).encode()
            target.writestr(item, data)
    pruned.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / "shared" / "wheels")
    parser.add_argument("--python", nargs="+", default=["3.11", "3.12"], help="the GPU machine's Python versions")
    parser.add_argument("--skip", nargs="*", default=[], help="packages the GPU machine already has")
    parser.add_argument("--cuda", nargs="*", default=[],
                        help="CUDA builds of bitsandbytes to keep, as its library names spell them (130 = CUDA 13.0)")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    pins = closure(WANTED, {canonical(s) for s in args.skip})
    specs = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (args.dir / "requirements.txt").write_text("\n".join(specs) + "\n")
    pip = [sys.executable, "-m", "pip"]
    sdist_only = []
    for spec in specs:
        for version in args.python:
            got = subprocess.run(
                [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(args.dir), "--python-version",
                 version, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                 "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "linux_x86_64", spec],
                capture_output=True, text=True)
            if got.returncode != 0:
                sdist_only.append(spec)
                break
    for spec in sdist_only:  # e.g. deepspeed: an sdist whose wheel is pure Python
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(args.dir), spec], check=True)
    if args.cuda:
        for wheel in args.dir.glob("bitsandbytes-*.whl"):
            prune_gpu_libraries(wheel, set(args.cuda))
    size = sum(p.stat().st_size for p in args.dir.iterdir())
    print(f"{len(specs)} packages ({', '.join(sdist_only) or 'none'} built from source) in {args.dir}: "
          f"{size / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
