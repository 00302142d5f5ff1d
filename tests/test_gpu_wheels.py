"""scripts/gather_gpu_wheels.py: the pruned bitsandbytes wheel keeps what the GPU machine loads and pip installs it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from gather_gpu_wheels import prune_gpu_libraries  # noqa: E402

LIBRARIES = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026"]


def test_pruning_keeps_the_named_cuda_builds_and_a_consistent_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.0.1-py3-none-any.whl"
    files = {f"bitsandbytes/libbitsandbytes_{name}.so": b"\0" * 64 for name in LIBRARIES}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.0.1'\n"
    files["bitsandbytes-0.0.1.dist-info/METADATA"] = b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0.1\n"
    files["bitsandbytes-0.0.1.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "bitsandbytes-0.0.1.dist-info/RECORD"
    files[record] = "".join(f"{name},,\n" for name in [*files, record]).encode()  # a RECORD lists itself too
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)

    prune_gpu_libraries(wheel, {"130", "132"})

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        listed = archive.read(record).decode()
    libraries = {name for name in names if name.endswith(".so")}
    assert libraries == {f"bitsandbytes/libbitsandbytes_{n}.so" for n in ("cpu", "cuda130", "cuda132", "xpu2026")}
    assert {line.split(",")[0] for line in listed.splitlines()} == names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    assert (target / "bitsandbytes" / "libbitsandbytes_cuda130.so").is_file()
    assert not (target / "bitsandbytes" / "libbitsandbytes_cuda128.so").exists()
