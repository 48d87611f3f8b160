"""`moeinf run` as a real process: the REPL in a pseudo-terminal, and one-shot runs in pipes.

The model is the tiny Mixtral fixture pulled into the test's store. The REPL is driven through a pty
(stdin and stdout are terminals, so `run` starts the REPL), pipes through subprocess.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from moeinf.pull import pull
from moeinf.runtime.tokenizer import Tokenizer
from tests.fixtures.checkpoints import build_checkpoint

MAIN = "from moeinf.cli.main import main; main()"
pytestmark = pytest.mark.slow  # real processes: each one imports torch


@pytest.fixture
def model(checkpoint) -> str:
    return pull(str(checkpoint("mixtral"))).name


class Terminal:
    """A process on a pseudo-terminal, read with `expect` (pexpect-like, stdlib only)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "TERM": "dumb", "COLUMNS": "120"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin, stdout and stderr are the terminal
            os.execve(sys.executable, [sys.executable, "-c", MAIN, *args], env)
        self.seen = b""
        self.pos = 0

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait for `text` after what was matched before; return the output up to and including it."""
        needle, deadline = text.encode(), time.monotonic() + timeout
        while (found := self.seen.find(needle, self.pos)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.seen[self.pos :]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the process closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"process ended before {text!r}; got {self.seen[self.pos :]!r}")
            self.seen += chunk
        out = self.seen[self.pos : found + len(needle)].decode(errors="replace")
        self.pos = found + len(needle)
        return out

    def wait_for_bytes(self, n: int, timeout: float = 60) -> None:
        """Wait until at least `n` more bytes arrived after the last match."""
        deadline = time.monotonic() + timeout
        while len(self.seen) - self.pos < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"timed out waiting for output; got {self.seen[self.pos :]!r}")
            self.seen += os.read(self.fd, 4096)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain so the child never blocks on a full terminal buffer
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the REPL did not exit")


# pty.fork() warns in a multi-threaded process (torch's threads); the child only execs, so it is safe,
# and the pty must become the child's controlling terminal for Ctrl-C to reach it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_repl_in_a_terminal(model):
    term = Terminal("run", model, "--temperature", "0")
    try:
        term.expect(">>> ")
        term.send("/set verbose\n")
        term.expect("Set 'verbose' mode.")
        term.expect(">>> ")
        term.send("/set parameter num_predict 5\n")
        term.expect("Set parameter 'num_predict' to '5'")
        term.expect(">>> ")
        term.send("Hello there\n")
        first = term.expect(">>> ")
        assert "eval count:           5 token(s)" in first and "prompt cache count" not in first
        term.send("And again\n")
        second = term.expect(">>> ")
        # The second turn's prompt holds the first turn (conversation kept), mostly from the KV cache.
        assert "prompt cache count:" in second
        term.send('"""first line\n')
        term.expect("... ")
        term.send('second line"""\n')
        term.expect("eval rate:")
        term.expect(">>> ")
        term.send("/show info\n")
        info = term.expect("context length")
        assert "architecture" in info and "mixtral" in info
        term.expect(">>> ")
        # Ctrl-C at the prompt does not exit. Sent again if needed: a SIGINT that lands after readline
        # printed the prompt but before it waits on the terminal is only noticed at the next key
        # (CPython's readline loop), a race a busy machine makes likely, a person never meets.
        for attempt in range(5):
            term.send("\x03")
            try:
                term.expect("Use Ctrl + d or /bye to exit.", timeout=3)
                break
            except AssertionError:
                if attempt == 4:
                    raise
        # Wait for the prompt: a ^D typed before readline takes the terminal is lost.
        term.expect(">>> ")
        term.send("\x04")  # Ctrl-D exits (/bye is tested in test_repl.py)
        assert term.wait() == 0
    finally:
        if term.fd >= 0:
            try:
                os.kill(term.pid, signal.SIGKILL)
                os.waitpid(term.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_ctrl_c_stops_the_answer_in_a_terminal(tmp_path):
    # A context of 4096 positions and --ignore-eos: the answer runs for seconds unless interrupted.
    ckpt = build_checkpoint("olmoe", tmp_path / "long-olmoe", max_position_embeddings=4096)
    name = pull(str(ckpt)).name
    term = Terminal("run", name, "--ignore-eos", "--device", "cpu", "--verbose")
    term.expect(">>> ")
    term.send("Tell me everything\n")
    term.expect("Tell me everything")
    term.wait_for_bytes(40)  # the answer is streaming
    term.send("\x03")
    stats = term.expect(">>> ", timeout=20)
    generated = int(re.search(r"eval count:\s+(\d+) token", stats).group(1))
    assert 0 < generated < 4000  # stopped long before the context was full
    term.send("/show info\n")  # still alive and answering commands
    term.expect("context length")
    term.expect(">>> ")
    term.send("\x04")
    assert term.wait() == 0


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", MAIN, "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


def test_piped_stdin_goes_before_the_prompt_and_output_is_plain(model, isolated_home):
    notes = "Some notes about experts.\nSecond line.\n"
    done = _run(
        model, "summarise", "--raw", "--format", "json", "--max-tokens", "6", "--ignore-eos", stdin=notes
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    tokenizer = Tokenizer.from_dir(isolated_home / "models" / model)
    assert out["prompt_token_ids"] == tokenizer.encode(notes + " summarise")

    plain = _run(model, "summarise", "--raw", "--max-tokens", "6", "--ignore-eos", stdin=notes)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b" not in plain.stdout + plain.stderr  # no colour, spinner or cursor control
    assert plain.stdout == out["text"] + ("" if out["text"].endswith("\n") else "\n")


def test_reader_closing_the_pipe_early_is_not_an_error(model):
    # `moeinf run m "..." | head -c 3`: the reader goes away mid-answer.
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, "run", model, "Hello", "--raw", "--ignore-eos", "--max-tokens", "200"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(3)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err
