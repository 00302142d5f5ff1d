"""`finetune chat`: talk to a model in the terminal, streaming, switching adapters on one base.

Reads lines from standard input, so it also runs with a pipe (tests feed it a script). Replies go
to standard output as they are generated; status lines go to standard error.
"""

from __future__ import annotations

import sys

from finetune.inference.load import BASE, Loaded, Sampling, prompt_text, stop_ids

HELP = (
    "commands: /adapter NAME (switch adapter), /base (adapters off), /adapters (list), "
    "/reset (forget the conversation), /help (this list), /quit"
)


def run_chat(loaded: Loaded, sampling: Sampling, *, system: str | None = None, stdin=None, stdout=None, log=None):
    """The read-reply loop; returns when input ends or on /quit."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    active = loaded.adapters[0] if loaded.adapters else BASE
    history: list[dict] = []
    tty = stdin.isatty()
    log(f"chatting with {_label(loaded, active)}; {HELP}")
    while True:
        if tty:
            print(f"[{active}] > ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/quit":
                return
            if command == "/help":
                log(HELP)
            elif command == "/reset":
                history.clear()
                log("conversation cleared")
            elif command == "/base":
                active = BASE
                log(f"now: {_label(loaded, active)}")
            elif command == "/adapters":
                log("adapters: " + (", ".join(loaded.adapters) or "none") + f"; active: {active}")
            elif command == "/adapter":
                if argument.strip() in loaded.adapters:
                    active = argument.strip()
                    log(f"now: {_label(loaded, active)}")
                else:
                    log(f"no adapter {argument.strip()!r}; loaded: {', '.join(loaded.adapters) or 'none'}")
            else:
                log(f"unknown command {command}; {HELP}")
            continue
        history.append({"role": "user", "content": text})
        streamer = _ReplyStreamer(loaded.tokenizer, stop_ids(loaded), skip_prompt=True, skip_special_tokens=False)
        streamer.on_finalized_text = _printer(stdout)
        with loaded.use(active):
            [reply] = _reply(loaded, history, sampling, system, streamer)
        history.append({"role": "assistant", "content": reply})


def _ReplyStreamer(tokenizer, stops: set[int], **kwargs):
    """transformers' TextStreamer that shows added special tokens (a trained `<tool_call>`) but not the tokens that
    end or pad the reply, as `decode_reply` does for generate and eval."""
    import torch
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            kept = [token for token in value.reshape(-1).tolist() if token not in stops]
            if kept:
                super().put(torch.tensor(kept))

    return ReplyStreamer(tokenizer, **kwargs)


def _printer(stdout):
    """TextStreamer's output hook: print chunks as they come, without the reply's leading space."""
    started = False

    def on_text(chunk: str, stream_end: bool = False) -> None:
        nonlocal started
        if not started:
            chunk = chunk.lstrip()
            started = bool(chunk)
        print(chunk, end="\n" if stream_end else "", file=stdout, flush=True)

    return on_text


def _reply(loaded: Loaded, history, sampling: Sampling, system, streamer) -> list[str]:
    from finetune.inference.load import generate_texts

    return generate_texts(loaded, [prompt_text(loaded.tokenizer, history, system)], sampling, streamer=streamer)


def _label(loaded: Loaded, active: str) -> str:
    if active == BASE:
        return f"the base model {loaded.source.base}" + (" (adapters off)" if loaded.adapters else "")
    return f"adapter {active} on {loaded.source.base}"
