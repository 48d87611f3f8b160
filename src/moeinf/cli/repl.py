"""The interactive `moeinf run` loop, like `ollama run`: `>>> ` prompt, `\"\"\"` multi-line input, slash
commands, Ctrl-C stops the answer, Ctrl-D exits. Input comes from a `read_line` function (readline's
`input` in a terminal) so that the loop is testable; output goes to the given streams.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from moeinf.cli.session import ChatSession, display_start, format_stats
from moeinf.errors import MoeinfError

PROMPT, CONTINUATION = ">>> ", "... "
FENCE = '"""'

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, top_k, top_p, min_p, repeat_penalty,
                              repeat_last_n, seed, num_predict, stop)
  /set system TEXT            Set the system message
  /set verbose                Show statistics after each answer
  /set quiet                  Stop showing statistics
  /show info                  Show details about this model
  /clear                      Clear the session context
  /bye                        Exit
  /?, /help                   Help for a command

Use \"\"\" to begin a multi-line message."""


def model_info(session: ChatSession) -> str:
    engine = session.engine
    rows: list[tuple[str, object]] = []
    spec = engine.spec
    if spec is not None:
        rows += [
            ("architecture", spec.family),
            ("layers", f"{spec.num_layers} ({len(spec.moe_layers)} MoE)"),
            ("experts", f"{spec.num_experts} routed, top-{spec.top_k}, {spec.num_shared_experts} shared"),
            ("hidden size", spec.hidden_size),
            ("vocabulary", spec.vocab_size),
            ("max context", spec.max_position_embeddings),
            ("weights dtype", spec.dtype),
        ]
    rows += [
        ("context length", engine.context_length),
        ("device", f"{engine.device} ({str(engine.dtype).removeprefix('torch.')})"),
        ("threads", engine.threads),
        ("chat template", "no (raw prompts)" if not engine.tokenizer.has_chat_template else "yes"),
    ]
    sampling = session.params.sampling
    params = [
        ("temperature", sampling.temperature),
        ("top_k", sampling.top_k),
        ("top_p", sampling.top_p),
        ("min_p", sampling.min_p),
        ("repeat_penalty", sampling.repeat_penalty),
        ("seed", sampling.seed),
        ("num_predict", session.params.max_tokens),
        ("stop", " ".join(session.params.stop) or None),
    ]
    lines = ["  Model"] + [f"    {k:<20}{v}" for k, v in rows if v is not None]
    lines += ["", "  Parameters"] + [f"    {k:<20}{v}" for k, v in params if v is not None]
    if session.system:
        lines += ["", "  System", f"    {session.system}"]
    return "\n".join(lines)


class Repl:
    def __init__(
        self,
        session: ChatSession,
        *,
        read_line: Callable[[str], str] = input,
        out: TextIO | None = None,
        err: TextIO | None = None,
        verbose: bool = False,
    ) -> None:
        self.session = session
        self.read_line = read_line
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.verbose = verbose
        self._load_s = session.engine.load_s  # reported once, with the first answer

    def run(self) -> None:
        """Until /bye or Ctrl-D."""
        while True:
            try:
                text = self._read_message()
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if text is None or not text.strip():
                continue
            if text.startswith("/"):
                if self._command(text.strip()):
                    return
                continue
            self._answer(text)

    def _read_message(self) -> str | None:
        line = self.read_line(PROMPT)
        if not line.lstrip().startswith(FENCE):
            return line
        # """ starts a multi-line message, which ends at a line ending with """.
        body = line.lstrip()[len(FENCE) :]
        if body.rstrip().endswith(FENCE) and body.strip() != "":
            return body.rstrip()[: -len(FENCE)]
        lines = [body] if body else []
        while True:
            line = self.read_line(CONTINUATION)
            if line.rstrip().endswith(FENCE):
                lines.append(line.rstrip()[: -len(FENCE)])
                return "\n".join(lines)
            lines.append(line)

    def _command(self, text: str) -> bool:
        """Run a slash command; True means exit."""
        words = text.split(maxsplit=3)
        head = words[0]
        try:
            if head in ("/bye", "/exit"):
                return True
            if head in ("/?", "/help"):
                self.out.write(HELP + "\n\n")
            elif head == "/clear":
                self.session.clear()
                self.out.write("Cleared session context\n")
            elif head == "/show" and words[1:2] == ["info"]:
                self.out.write(model_info(self.session) + "\n\n")
            elif head == "/set" and words[1:2] == ["parameter"] and len(words) == 4:
                self.session.set_parameter(words[2], words[3])
                self.out.write(f"Set parameter '{words[2]}' to '{words[3]}'\n")
            elif head == "/set" and words[1:2] == ["system"] and len(words) >= 3:
                self.session.system = text.split(maxsplit=2)[2].strip().strip('"')
                self.out.write("Set system message.\n")
            elif head == "/set" and words[1:] == ["verbose"]:
                self.verbose = True
                self.out.write("Set 'verbose' mode.\n")
            elif head == "/set" and words[1:] == ["quiet"]:
                self.verbose = False
                self.out.write("Set 'quiet' mode.\n")
            else:
                self.out.write(f"Unknown command '{text}'. Type /? for help\n")
        except MoeinfError as exc:
            self.out.write(f"Error: {exc}\n")
        return False

    def _answer(self, text: str) -> None:
        import time

        start = time.perf_counter()
        stream = self.session.ask(text)
        started = self.session.raw
        last = None
        try:
            for last in stream:
                shown, started = display_start(last.text, started)
                if shown:
                    self.out.write(shown)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()  # the turn is not recorded; the KV cache stays consistent
        except MoeinfError as exc:
            self.out.write(f"\nError: {exc}\n")
            return
        self.out.write("\n\n")
        self.out.flush()
        if self.verbose and last is not None:
            total = time.perf_counter() - start
            self.err.write(format_stats(self._load_s, total, last.timings, last.cache) + "\n\n")
            self._load_s = 0.0
            self.err.flush()
