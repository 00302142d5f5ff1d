"""finetune: fine-tune large language models from one YAML recipe."""

from finetune.logs import drop_unactionable_lines

__version__ = "0.1.0"

drop_unactionable_lines()
