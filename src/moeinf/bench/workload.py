"""The bench workload: the built-in prompt set (chat, code, summary) or prompts read from a file.

A prompts file is either JSON lines (`{"prompt": ..., "name": ...}`, name optional) or plain text
with one prompt per non-empty line. Prompts are (name, text) pairs; the bench applies the model's
chat template when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeinf.errors import BadOption

Prompt = tuple[str, str]  # (name, text)

BUILTIN_PROMPTS: tuple[Prompt, ...] = (
    ("chat", "Hi! I am planning a weekend trip to the mountains. What should I pack for two days of hiking?"),
    (
        "code",
        "Write a Python function that reads a CSV file and returns the average of the column named "
        "'price', skipping rows where the value is missing.",
    ),
    (
        "summary",
        "Summarize the following text in two sentences: The city council met on Tuesday to discuss "
        "the new bicycle lanes. Residents spoke for and against the plan; shop owners worried about "
        "parking, while parents said the lanes would make the way to school safer. The council voted "
        "five to two to build the first lane next spring and to review it after one year.",
    ),
)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file (see the module docstring); an empty or unreadable file is a BadOption."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadOption(f"cannot read --prompts {path}: {exc.strerror}") from None
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
                prompts.append((str(item.get("name") or f"p{len(prompts) + 1}"), str(item["prompt"])))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise BadOption(f'{path}:{number}: expected a JSON object with a "prompt" field') from None
        else:
            prompts.append((f"p{len(prompts) + 1}", line))
    if not prompts:
        raise BadOption(f"--prompts {path} holds no prompt")
    return prompts
