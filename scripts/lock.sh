#!/usr/bin/env bash
# Refresh constraints.txt: the exact version of every package that CI, the README commands and the
# Docker image install (torch 2.13.0, the package, every extra in pyproject.toml, and all they pull in).
#
#   scripts/lock.sh              install the newest releases pyproject.toml admits into a fresh venv,
#                                write them to constraints.txt, then run the test suite on that set
#   scripts/lock.sh --no-test    the same without the suite (run it yourself before committing)
#   scripts/lock.sh --dry-run    install and test the newest set, print its diff against constraints.txt,
#                                leave the file alone (.ci/run-latest: see drift before users do)
#   scripts/lock.sh --floor      install every direct dependency at its lower bound (==) instead, run the
#                                suite, write nothing (the result goes to docs/dependencies.md)
#   --venv DIR                   build the venv in DIR and keep it (default: a temp dir, removed at exit)
#
# After adding or changing a dependency or an extra in pyproject.toml: run scripts/lock.sh and commit
# pyproject.toml and constraints.txt together. Extras are read from pyproject.toml, so a new extra is
# locked with no change here. The lock is made on Linux x86_64 with this machine's python3 (3.11).
# torch is written as torch==2.13.0 (no +cpu): a GPU box installs its CUDA build of 2.13.0 first and
# the constraint keeps it. Set FINETUNE_TORCH to lock another torch. Needs only the package index.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${FINETUNE_TORCH:-2.13.0}
mode=lock test=1 venv=
while [ $# -gt 0 ]; do
  case $1 in
    --no-test) test=0 ;;
    --dry-run) mode=dry-run ;;
    --floor) mode=floor ;;
    --venv) venv=$(realpath -m "$2"); shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

work=$(mktemp -d "${TMPDIR:-/tmp}/finetune-lock.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
venv=${venv:-$work/venv}
if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then echo "--venv $venv exists and is not a venv" >&2; exit 2; fi
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q "torch==$torch_version"

# Every extra, and with --floor a constraint `name==X` for every `name>=X` the project declares.
extras=$(python - "$repo/pyproject.toml" "$work/floor.txt" "$mode" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
print(",".join(extras))
if sys.argv[3] == "floor":
    floors = {}
    for req in project["dependencies"] + [r for reqs in extras.values() for r in reqs]:
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^]]*\])?\s*[^;]*?>=\s*([^,;\s]+)", req)
        if match and match[1].lower() != "torch":
            floors[match[1].lower()] = match[2]
    open(sys.argv[2], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(floors.items())))
EOF
)

cd "$repo"
if [ "$mode" = floor ]; then
  echo "--- floor constraints"; cat "$work/floor.txt"
  pip install -q -c "$work/floor.txt" -e ".[$extras]"
else
  pip install -q -e ".[$extras]"
fi

{
  echo "# The supported stack, locked: every package that \`pip install -e '.[$extras]'\` installs"
  echo "# next to torch $torch_version (Python $(python -c 'import platform; print(platform.python_version())'), Linux x86_64), written by scripts/lock.sh"
  echo "# on $(date -u +%Y-%m-%d). Do not edit: change pyproject.toml and rerun scripts/lock.sh."
  echo "# Use: pip install torch==$torch_version && pip install -c constraints.txt -e '.[dev]'"
  # torch loses its local label (+cpu) so a CUDA build of the same release satisfies it.
  pip freeze --exclude-editable | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' | LC_ALL=C sort -f
} > "$work/constraints.txt"

changes=$(diff -u "$repo/constraints.txt" "$work/constraints.txt" 2>/dev/null | grep -E '^[-+][^-+#]' || true)
if [ "$mode" = lock ]; then
  echo "${changes:-(no change)}"
  cp "$work/constraints.txt" "$repo/constraints.txt"
  echo "wrote $repo/constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
else
  echo "--- installed (${mode})"; grep -v '^#' "$work/constraints.txt"
  echo "--- against constraints.txt (- locked, + installed)"
  echo "${changes:-(same as the lock)}"
fi

if [ "$test" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
  python -m pytest -q
fi
