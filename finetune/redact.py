"""Keep secrets out of everything a run writes: tokens and keys from the environment or the recipe.

Two sources of secrets are recognised: the values of environment variables whose names say they
hold one (HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...), and
strings shaped like the well-known key formats (Hugging Face, OpenAI, GitHub, AWS, Slack, GitLab,
JWTs) wherever they appear. Both are replaced by REDACTED before a file is written.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"

# A variable holds a secret when one of the `_`-separated parts of its name is one of these.
# Matching parts (not substrings) keeps TOKENIZERS_PARALLELISM and PWD out.
SECRET_NAME_PARTS = {
    "TOKEN", "KEY", "APIKEY", "SECRET", "PASSWORD", "PASSWD", "PASS", "CREDENTIAL", "CREDENTIALS",
    "AUTH", "PAT", "PRIVATE",
}
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are flags, and replacing them would mangle files

SECRET_PATTERNS = re.compile(
    "|".join(
        [
            r"hf_[A-Za-z0-9]{20,}",  # Hugging Face
            r"sk-[A-Za-z0-9_-]{20,}",  # OpenAI and others
            r"gh[pousr]_[A-Za-z0-9]{20,}",  # GitHub
            r"github_pat_[A-Za-z0-9_]{20,}",
            r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
            r"AKIA[0-9A-Z]{16}",  # AWS access key id
            r"xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
            r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",  # JWT
            r"wandb_v\d+_[A-Za-z0-9_]{20,}",  # W&B (new format; the old one is 40 hex, like a git sha)
        ]
    )
)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret."""
    return any(part in SECRET_NAME_PARTS for part in name.upper().split("_"))


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the secret-named environment variables, longest first (so no secret is half-replaced)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v.strip()) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every environment secret and every key-shaped string replaced by REDACTED."""
    for secret in env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return SECRET_PATTERNS.sub(REDACTED, text)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string passed through redact_text."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {redact_text(str(k), secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def secret_key_paths(value: Any, prefix: str = "") -> list[str]:
    """Key paths (like `logging.run_name`) of the strings in a recipe dict that hold a secret."""
    secrets = env_secrets()
    if isinstance(value, str):
        return [prefix or "<value>"] if redact_text(value, secrets) != value else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in secret_key_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in secret_key_paths(v, f"{prefix}[{i}]")]
    return []
