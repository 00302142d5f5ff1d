"""The data pipeline on real files and the tiny tokenizer: formats, sources, bad rows, mixing, cache, preview."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.recipe import recipe_from_dict
from tests.conftest import run_cli

USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"messages": [USER, {"role": "assistant", "content": "The capital of France is Paris."}]}


def tokenizer_for(recipe):
    from finetune.data.prepare import set_chat_template
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(recipe.model.path), recipe.model)
    set_chat_template(recipe, tokenizer)
    return tokenizer


def make_recipe(train: list[dict], max_length: int = 256, **data):
    return recipe_from_dict({
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": train, **data},
        "method": {"kind": "sft"},
        "training": {"max_length": max_length},
    })  # fmt: skip


def prepare(train: list[dict], *, log: list[str] | None = None, max_length: int = 256, **data):
    """prepare_datasets for a recipe with these datasets; returns (train, eval, audits, tokenizer)."""
    from finetune.data.prepare import prepare_datasets

    recipe = make_recipe(train, max_length, **data)
    tokenizer = tokenizer_for(recipe)
    lines = [] if log is None else log
    train_ds, eval_ds, audits = prepare_datasets(recipe, tokenizer, lines.append)
    return train_ds, eval_ds, audits, tokenizer


def write_lines(path: Path, lines: list) -> Path:
    data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test gets an empty data cache (the tiny model stays in the session cache)."""
    monkeypatch.setattr("finetune.data.cache.cache_root", lambda: tmp_path / "data-cache")


# --- formats and column mapping -----------------------------------------------------------------


def test_sharegpt_alpaca_text_and_renamed_columns_train_the_right_tokens(tmp_path, torch_one_thread):
    sharegpt = write_lines(tmp_path / "sharegpt.jsonl", [{
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Q one?"}, {"from": "gpt", "value": "A one."},
                          {"from": "human", "value": "Q two?"}, {"from": "bot", "value": "A two."}],
    }])  # fmt: skip
    alpaca = write_lines(tmp_path / "alpaca.jsonl", [{"q": "Reverse it.", "ctx": "cat", "a": "tac"}])
    text = write_lines(tmp_path / "text.jsonl", [{"body": "Plain prose to learn."}])
    train, _, audits, tokenizer = prepare([
        {"path": str(sharegpt), "format": "sharegpt", "roles": {"bot": "assistant"}},
        {"path": str(alpaca), "format": "alpaca", "columns": {"instruction": "q", "input": "ctx", "output": "a"}},
        {"path": str(text), "format": "text", "columns": {"text": "body"}},
    ])  # fmt: skip
    rows = {Path(row["source"].rsplit(":", 1)[0]).stem: row for row in train}
    assert trained_text(tokenizer, rows["sharegpt"]) == "A one.<|im_end|>A two.<|im_end|>"
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tokenizer.decode(rows["sharegpt"]["input_ids"])
    assert trained_text(tokenizer, rows["alpaca"]) == "tac<|im_end|>"
    assert "<|im_start|>user\nReverse it.\n\ncat<|im_end|>" in tokenizer.decode(rows["alpaca"]["input_ids"])
    assert trained_text(tokenizer, rows["text"]) == "Plain prose to learn.<|im_end|>"  # every token, plus EOS
    assert [a.trained_fraction for a in audits][2] == 1.0


def test_parquet_and_csv_rows_are_read_and_numbered(tmp_path, torch_one_thread):
    import datasets

    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(tmp_path / "chat.parquet"))
    (tmp_path / "qa.csv").write_text('question,answer\nWhat is 1 plus 1?,2\n"Say\n""hi""",\nNA,None\n')
    with pytest.raises(UserError) as info:
        prepare([{"path": str(tmp_path / "chat.parquet")},
                 {"path": str(tmp_path / "qa.csv"), "format": "alpaca",
                  "columns": {"instruction": "question", "output": "answer"}}])  # fmt: skip
    assert f"{tmp_path / 'qa.csv'}:3: 'answer' is empty" in info.value.render()  # line 3; the row spans two
    train, _, audits, _ = prepare([{"path": str(tmp_path / "chat.parquet")}, {
        "path": str(tmp_path / "qa.csv"), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}
    }], on_bad_row="skip")  # fmt: skip
    assert (audits[0].kept, audits[1].kept, audits[1].rows) == (2, 2, 3)  # "2", "NA", "None" stay text
    assert f"{tmp_path / 'chat.parquet'} row 2" in train["source"]


def test_txt_paragraphs_are_rows_and_long_texts_are_split_not_cut(tmp_path, torch_one_thread):
    long = " ".join(f"word{i}" for i in range(200))
    path = tmp_path / "corpus.txt"
    path.write_text(f"First paragraph,\nsecond line.\n\n\nSecond paragraph.\n\n{long}\n")
    train, _, (audit,), tokenizer = prepare([{"path": str(path), "format": "text"}], log=None)
    assert audit.rows == 3 and audit.split_rows == 1 and audit.truncated == 0
    sources = sorted(row["source"] for row in train)
    assert sources[0] == f"{path}:1" and sources[1] == f"{path}:5" and all(s == f"{path}:7" for s in sources[2:])
    pieces = [row for row in train if row["source"] == f"{path}:7"]
    assert len(pieces) > 1 and all(len(row["input_ids"]) <= 256 for row in pieces)
    assert sum(len(row["input_ids"]) for row in pieces) == audit.length_max  # no token lost
    assert all(label != -100 for row in train for label in row["labels"])


# --- sources -------------------------------------------------------------------------------------


def test_folders_and_globs_read_every_data_file(tmp_path, torch_one_thread):
    folder = tmp_path / "chats"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [GOOD] * 2)
    write_lines(folder / "b.jsonl", [GOOD] * 3)
    (folder / "README.md").write_text("not data")
    assert prepare([{"path": str(folder)}])[2][0].kept == 5
    assert prepare([{"path": str(folder / "b*.jsonl")}])[2][0].kept == 3
    with pytest.raises(UserError, match=r"data.train\[0\].path: .*c\*.jsonl matches no file"):
        prepare([{"path": str(folder / "c*.jsonl")}])


def test_several_processes_give_the_same_rows(tmp_path, monkeypatch, torch_one_thread):
    path = write_lines(tmp_path / "train.jsonl", [GOOD] * 30 + [{"messages": [USER]}] + [GOOD] * 9)
    one = prepare([{"path": str(path)}], on_bad_row="skip")
    monkeypatch.setattr("finetune.data.cache.cache_root", lambda: tmp_path / "other-cache")
    two = prepare([{"path": str(path)}], on_bad_row="skip", num_proc=2)
    assert one[0][:] == two[0][:] and one[2] == two[2]
    assert two[2][0].dropped["no assistant turn"]["first"] == [f"{path}:31"]


def test_hub_dataset_offline_says_why_and_how_to_fix():
    # A real load_dataset call: HF_HUB_OFFLINE=1 (conftest) makes it fail at once, as it would without network.
    with pytest.raises(UserError) as info:
        prepare([{"path": "someorg/somedata", "split": "train[:10%]", "subset": "en"}])
    message = info.value.render()
    assert "data.train[0].path: cannot load the Hub dataset 'someorg/somedata'" in message
    assert "offline" in message and "HF_HUB_OFFLINE" in message


# --- bad rows ------------------------------------------------------------------------------------

ASSISTANT_EMPTY = {"messages": [USER, {"role": "assistant", "content": "  "}]}
BAD_ROWS = {
    "malformed JSON": (b'{"messages": [oops', "malformed JSON at column 15"),
    "missing field 'messages'": ({"conversation": []}, "missing field 'messages'; the row has 'conversation'"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] has role 'bot'"),
    "empty assistant turn": (ASSISTANT_EMPTY, "messages[1] is an empty assistant turn"),
    "not valid UTF-8": (b'{"messages": "\xff"}', "not valid UTF-8 (byte 15 of the line)"),
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_line_57_is_an_error_naming_file_and_line_or_a_counted_skip(reason, tmp_path, torch_one_thread):
    line, detail = BAD_ROWS[reason]
    path = write_lines(tmp_path / "train.jsonl", [GOOD] * 56 + [line] + [GOOD] * 3)
    with pytest.raises(UserError) as info:
        prepare([{"path": str(path)}])
    assert f"{path}:57: {detail}" in info.value.render()
    assert "data.on_bad_row: skip" in str(info.value)
    _, _, (audit,), _ = prepare([{"path": str(path)}], on_bad_row="skip")
    assert audit.dropped == {reason: {"count": 1, "first": [f"{path}:57"]}}
    assert (audit.rows, audit.kept) == (60, 59)


def test_skip_lists_the_first_five_rows_and_empty_files(tmp_path, torch_one_thread):
    folder = tmp_path / "data"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [GOOD, *[{"messages": [USER]}] * 7, GOOD])
    (folder / "b.jsonl").write_text("\n\n")
    with pytest.raises(UserError) as info:
        prepare([{"path": str(folder)}])
    assert "8 rows do not fit format 'messages'" in str(info.value)
    assert f"{folder / 'b.jsonl'}: the file has no rows" in info.value.render()
    _, _, (audit,), _ = prepare([{"path": str(folder)}], on_bad_row="skip")
    assert audit.dropped["no assistant turn"] == {
        "count": 7,
        "first": [f"{folder / 'a.jsonl'}:{n}" for n in range(2, 7)],
    }
    assert audit.dropped["empty file"] == {"count": 1, "first": [str(folder / "b.jsonl")]}
    assert (audit.rows, audit.kept) == (9, 2)


def test_a_dataset_left_with_nothing_to_train_is_an_error(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [{"messages": [USER]}])
    with pytest.raises(UserError, match="no trained tokens"):
        prepare([{"path": str(path)}], on_bad_row="skip")


# --- tool calls, exactness, end of turn, template dates ------------------------------------------


def test_tool_calls_train_and_tool_results_never_do(tmp_path, torch_one_thread):
    train, _, (audit,), tokenizer = prepare(
        [{"path": "builtin:sample_tool_calls.jsonl", "max_rows": 6}], chat_template="qwen2.5", max_length=1024)
    assert audit.kept == 6 and audit.end_of_turn == ["<|im_end|>"] and audit.rows_without_end_of_turn == 0
    from finetune.data.preview import token_segments

    for row in train:
        segments = token_segments(tokenizer, row["input_ids"], row["labels"])
        trained = [text for text, on in segments if on]
        masked = "".join(text for text, on in segments if not on)
        call = re.findall(r"<tool_call>\n(.*)\n</tool_call>", "".join(t for t, _ in segments))[-1]  # [0]: example
        assert trained[0] == f"<tool_call>\n{call}\n</tool_call><|im_end|>"  # the call, written by the assistant
        assert len(trained) == 2 and trained[1].endswith(".<|im_end|>")  # and the reply
        assert re.search(r"<\|im_start\|>user\n<tool_response>\n\w+\n</tool_response><\|im_end\|>", masked)


def test_tool_rows_are_checked_and_unknown_roles_are_never_advised_to_be_assistant(tmp_path, torch_one_thread):
    call_only = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "capital", "arguments": {"country": "France"}}}]},
        {"role": "tool", "content": "Paris"}, {"role": "assistant", "content": "Paris."}]}
    bad_calls = {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": "capital(France)"}]}
    function_role = {"messages": [USER, {"role": "function", "content": "Paris"},
                                  {"role": "assistant", "content": "Paris."}]}
    path = write_lines(tmp_path / "t.jsonl", [call_only, bad_calls, function_role])
    with pytest.raises(UserError) as info:
        prepare([{"path": str(path)}], chat_template="qwen2.5")
    message = info.value.render()
    assert f"{path}:2: messages[1].tool_calls must be a list of" in message
    assert f"{path}:3: messages[1] has role 'function'" in message and "tool for tool or function results" in message
    assert "roles: {function: assistant}" not in message
    _, _, (audit,), _ = prepare([{"path": str(path)}], chat_template="qwen2.5", on_bad_row="skip")
    assert audit.kept == 1
    _, _, (mapped,), _ = prepare([{"path": str(path), "roles": {"function": "tool"}}], chat_template="qwen2.5",
                                 on_bad_row="skip")
    assert mapped.kept == 2


def test_rows_a_template_cannot_train_exactly_stop_the_run_even_with_skip(tmp_path, torch_one_thread):
    thought = {"messages": [USER, {"role": "assistant", "content": "Paris.", "reasoning_content": "I know it."},
                            {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]}
    path = write_lines(tmp_path / "train.jsonl", [GOOD, thought])
    for on_bad_row in ("error", "skip"):
        with pytest.raises(UserError) as info:
            prepare([{"path": str(path)}], chat_template="qwen3", on_bad_row=on_bad_row)
        message = info.value.render()
        assert "cannot train 1 row(s)" in message and f"{path}:2: Assistant turn 1 (message 1)" in message
        assert "data.train_on: last_assistant" in message
    _, _, (audit,), _ = prepare([{"path": str(path)}], chat_template="qwen3", train_on="last_assistant")
    assert audit.kept == 2


def test_a_template_that_trains_no_stop_token_is_warned_about_and_audited(tmp_path, torch_one_thread):
    template = tmp_path / "no_end.jinja"  # ChatGLM3's shape: the next header follows a reply directly
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n {{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    path = numbered(tmp_path / "train.jsonl", 4)
    log: list[str] = []
    _, _, (audit,), _ = prepare([{"path": str(path)}], chat_template=str(template), log=log)
    assert audit.rows_without_end_of_turn == 4 and audit.end_of_turn == []
    warnings = [line for line in log if line.startswith("warning:") and "no stop token is trained" in line]
    assert len(warnings) == 1 and "4 row(s)" in warnings[0], log


def test_a_template_that_prints_the_date_shows_one_pinned_date_recorded_in_audit_and_key(tmp_path, torch_one_thread):
    from datetime import date

    from finetune.data.cache import cache_key
    from finetune.data.render import renders_date

    path = numbered(tmp_path / "train.jsonl", 2)
    log: list[str] = []
    train, _, (audit,), tokenizer = prepare([{"path": str(path)}], chat_template="llama-3.2", log=log)
    today = date.today()
    assert audit.template_date == today.isoformat()
    assert any("prints today's date" in line and today.isoformat() in line for line in log)
    assert today.strftime("%d %b %Y") in tokenizer.decode(train[0]["input_ids"])
    pinned, _, (pinned_audit,), _ = prepare([{"path": str(path)}], chat_template="llama-3.2",
                                            template_date="2001-02-03")
    assert pinned_audit.template_date == "2001-02-03" and "03 Feb 2001" in tokenizer.decode(pinned[0]["input_ids"])
    recipe = make_recipe([{"path": str(path)}])
    template = tokenizer.chat_template
    assert renders_date(template) and not renders_date(tokenizer_for(recipe).chat_template)
    assert cache_key(recipe, tokenizer, template, {}, "2001-02-03") != cache_key(recipe, tokenizer, template, {},
                                                                                 "2001-02-04")
    _, _, (plain,), _ = prepare([{"path": str(path)}])
    assert plain.template_date is None  # the tiny model's ChatML prints no date


def test_cache_key_changes_with_the_libraries_and_the_encoding_format(tmp_path, monkeypatch):
    import finetune.data.cache as cache

    recipe = make_recipe([{"path": "builtin:sample_chat.jsonl"}])
    tokenizer = tokenizer_for(recipe)
    key = cache.cache_key(recipe, tokenizer, None, {})
    versions = cache.library_versions()
    assert set(versions) >= {"tokenizers", "transformers"}
    monkeypatch.setattr(cache, "library_versions", lambda: {**versions, "transformers": "99.0.0"})
    assert cache.cache_key(recipe, tokenizer, None, {}) != key
    monkeypatch.setattr(cache, "library_versions", lambda: versions)
    assert cache.cache_key(recipe, tokenizer, None, {}) == key
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    assert cache.cache_key(recipe, tokenizer, None, {}) != key
    monkeypatch.setattr(cache, "__version__", "0.0.0-other")
    assert cache.cache_key(recipe, tokenizer, None, {}) != key


# --- mixing, eval split, determinism -------------------------------------------------------------


def numbered(path: Path, count: int) -> Path:
    rows = [{"messages": [USER, {"role": "assistant", "content": f"Answer {i}."}]} for i in range(count)]
    return write_lines(path, rows)


def test_weights_samples_and_eval_fraction_are_seeded(tmp_path, monkeypatch, torch_one_thread):
    a, b = numbered(tmp_path / "a.jsonl", 40), numbered(tmp_path / "b.jsonl", 40)
    specs = [{"path": str(a), "weight": 2.0}, {"path": str(b), "samples": 10}]
    train, evaluation, audits, _ = prepare(specs, eval_fraction=0.1)
    assert [(x.kept, x.held_out, x.mixed_rows) for x in audits] == [(40, 4, 72), (40, 4, 10)]
    assert len(train) == 82 and len(evaluation) == 8
    assert not set(evaluation["source"]) & set(train["source"])  # held-out rows never train
    from_a = [s for s in train["source"] if s.startswith(str(a))]
    assert len(set(from_a)) == 36 and len(from_a) == 72  # weight 2: every kept row twice
    monkeypatch.setattr("finetune.data.cache.cache_root", lambda: tmp_path / "other-cache")
    again = prepare(specs, eval_fraction=0.1)[0]
    assert again["source"] == train["source"]  # same seed, same rows in the same order, without the cache
    other = recipe_from_dict({**make_recipe(specs).model_dump(), "training": {"max_length": 256, "seed": 7}})
    from finetune.data.prepare import prepare_datasets

    assert prepare_datasets(other, tokenizer_for(other), lambda _: None)[0]["source"] != train["source"]


# --- the cache -----------------------------------------------------------------------------------


def test_second_prepare_tokenises_nothing_until_content_changes(tmp_path, monkeypatch, torch_one_thread):
    import finetune.data.masks as masks

    calls = []  # one per row encoded
    encode = masks._encode
    monkeypatch.setattr(masks, "_encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    path = numbered(tmp_path / "train.jsonl", 30)
    log: list[str] = []
    first, _, _, tokenizer = prepare([{"path": str(path)}], log=log)
    assert len(calls) == 30 and "cache entry" in log[0]
    calls.clear()
    from finetune.data.prepare import prepare_datasets

    prepare_datasets(make_recipe([{"path": str(path)}]), tokenizer, log.append)  # the same, used, tokenizer
    assert calls == [] and "data: cache hit" in log[-2]
    os.utime(path, (1, 1))  # a new mtime, same bytes
    log.clear()
    again = prepare([{"path": str(path)}], log=log, num_proc=1, min_trainable_fraction=0.5)[0]
    assert calls == [] and "data: cache hit, nothing to tokenise" in log[0]
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    numbered(path, 31)  # new content at the same path
    prepare([{"path": str(path)}])
    assert len(calls) == 31
    calls.clear()
    prepare([{"path": str(path)}], chat_template="chatml")  # another template
    assert len(calls) == 31
    entries = sorted(p.name for p in (tmp_path / "data-cache").iterdir())
    assert len(entries) == 3 and not [e for e in entries if e.startswith(".")]  # no half-written leftovers


# --- preview -------------------------------------------------------------------------------------


def preview_recipe(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, USER,
                      {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                      {"role": "assistant", "content": "Rome."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    ]  # fmt: skip
    data = write_lines(tmp_path / "chat.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: builtin:tiny-llama}}\ndata: {{train: [{{path: {data}}}]}}\nmethod: {{kind: sft}}\n"
    )
    return recipe


EXPECTED_TRAINED = {"Paris.<|im_end|>", "Rome.<|im_end|>", "Hello there.<|im_end|>"}


def test_preview_marks_exactly_the_trained_tokens_of_a_template_without_generation_markers(tmp_path):
    from finetune.data.templates import BUILTIN_TEMPLATES

    assert not re.search(r"{%-?\s*generation\s*-?%}", BUILTIN_TEMPLATES["chatml"])  # stock ChatML: TRL refuses it
    result = run_cli("data", "preview", str(preview_recipe(tmp_path)), "-n", "2", "--set",
                     "data.chat_template=chatml", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    legend, out = result.stdout.split("\n", 1)
    assert legend == "trained tokens are inside [[ ]]; everything else is masked (no loss)"
    trained = {piece.split("]]", 1)[0] for piece in out.split("[[")[1:]}
    assert trained == EXPECTED_TRAINED, out
    assert "<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n[[Rome.<|im_end|>]]" in out
    assert "label audit" in out and "Traceback" not in result.stderr
    assert "│ data.train[0]" in out


def test_preview_json_and_colour(tmp_path, torch_one_thread):
    from rich.console import Console
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.data.preview import print_examples

    recipe = preview_recipe(tmp_path)
    result = CliRunner().invoke(app, ["data", "preview", str(recipe), "--json", "--set", "data.chat_template=chatml"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    trained = {s["text"] for example in report["examples"] for s in example["segments"] if s["trained"]}
    assert trained == EXPECTED_TRAINED and report["audit"][0]["kept"] == 2
    for example in report["examples"]:
        ids = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        assert len(ids) == example["trained_tokens"]
    buffer = io.StringIO()
    print_examples(Console(file=buffer, force_terminal=True, width=200), report["examples"], 2, colour=True)
    coloured = buffer.getvalue()
    assert "\x1b[1;32mParis.<|im_end|>" in coloured and "[[" not in coloured


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "preview", "--help"], ["data", "prepare", "--help"]])
def test_data_help_imports_no_ml_stack(argv, tmp_path):
    code = (
        "import sys\n"
        f"sys.argv = ['finetune', *{argv!r}]\n"
        "from finetune.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = ('torch', 'transformers', 'datasets', 'trl', 'peft')\n"
        "print('HEAVY=' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
