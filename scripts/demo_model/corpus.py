"""Build the demo model's training text: three clearly different domains, all offline, all from Debian.

Domains (licences and exact sources in SOURCES.md beside this file):
  code  - Python standard library source (/usr/lib/python3.11, Debian libpython3.11-*, PSF licence)
  docs  - Python documentation reST sources (Debian python3.11-doc, PSF licence)
  bible - King James Version of the Bible (Debian bible-kjv-text via the bible-kjv reader, public domain)

Needs (as root): apt-get update && apt-get install -y python3.11-doc bible-kjv bible-kjv-text
(`make demo-model` does this). Selection is deterministic: documents are ordered by the SHA-256 of their
name, taken until the per-domain cap; about 8% of each domain's documents (chosen by hash) are held out.
Writes OUT/<domain>.train.txt and OUT/<domain>.val.txt, documents separated by a form feed line.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

PY_VERSION = "3.11"
STDLIB_DIR = Path(f"/usr/lib/python{PY_VERSION}")
DOCS_DIR = Path(f"/usr/share/doc/python{PY_VERSION}/html/_sources")
DOMAINS = ("code", "docs", "bible")
DOC_SEPARATOR = "\n\f\n"  # never occurs inside a document (stripped on read)
APT_PACKAGES = (f"python{PY_VERSION}-doc", "bible-kjv", "bible-kjv-text")
# Stdlib folders that are tests, vendored third-party code or generated data, not ordinary PSF source.
CODE_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "encodings",
}
CODE_SKIP_PREFIXES = ("config-",)


def _rank(name: str) -> str:
    """Deterministic, content-independent order that mixes folders (unlike sorted paths)."""
    return hashlib.sha256(name.encode()).hexdigest()


def _is_val(name: str) -> bool:
    return int(_rank("val:" + name)[:8], 16) % 12 == 0


def code_documents() -> Iterator[tuple[str, str]]:
    for path in sorted(STDLIB_DIR.rglob("*.py")):
        rel = path.relative_to(STDLIB_DIR)
        parts = rel.parts[:-1]
        if any(p in CODE_SKIP_DIRS or p.startswith(CODE_SKIP_PREFIXES) for p in parts):
            continue
        yield str(rel), path.read_text(encoding="utf-8", errors="replace")


def docs_documents() -> Iterator[tuple[str, str]]:
    for path in sorted(DOCS_DIR.rglob("*.rst.txt")):
        rel = path.relative_to(DOCS_DIR)
        if rel.parts[0] in ("whatsnew",) or rel.name in ("license.rst.txt", "copyright.rst.txt"):
            continue  # changelogs and legal text are not documentation prose
        yield str(rel), path.read_text(encoding="utf-8", errors="replace")


_CHAPTER = re.compile(r"^(\S.*?) (\d+)$")


def bible_documents() -> Iterator[tuple[str, str]]:
    """One document per book, as the bible-kjv reader prints it (chapter headings, numbered verses)."""
    text = subprocess.run(
        ["bible", "-l100000", "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    books: dict[str, list[str]] = {}
    book = None
    for line in text.splitlines():
        m = _CHAPTER.match(line)
        if m:
            book = m.group(1)
        if book is not None:
            books.setdefault(book, []).append(line.replace("\f", ""))
    for name, lines in books.items():
        yield name, "\n".join(lines).strip() + "\n"


SOURCES = {"code": code_documents, "docs": docs_documents, "bible": bible_documents}


def check_requirements() -> None:
    missing = []
    if not STDLIB_DIR.is_dir():
        missing.append(f"libpython{PY_VERSION}-stdlib")
    if not DOCS_DIR.is_dir():
        missing.append(f"python{PY_VERSION}-doc")
    if shutil.which("bible") is None or not Path("/usr/lib/bible.data").exists():
        missing.append("bible-kjv bible-kjv-text")
    if missing:
        raise SystemExit(
            "corpus.py needs Debian packages: apt-get update && apt-get install -y " + " ".join(missing)
        )


def build_domain(domain: str, out_dir: Path, cap_bytes: int) -> tuple[int, int, int]:
    """Write one domain's train/val files; returns (documents, train bytes, val bytes)."""
    docs = sorted(SOURCES[domain](), key=lambda d: _rank(d[0]))
    train, val, total = [], [], 0
    for name, text in docs:
        text = text.replace("\f", "").strip()
        if not text:
            continue
        (val if _is_val(name) else train).append(text)
        total += len(text.encode())
        if total >= cap_bytes:
            break
    (out_dir / f"{domain}.train.txt").write_text(DOC_SEPARATOR.join(train), encoding="utf-8")
    (out_dir / f"{domain}.val.txt").write_text(DOC_SEPARATOR.join(val), encoding="utf-8")
    return len(train) + len(val), sum(map(len, train)), sum(map(len, val))


def read_documents(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo_model/corpus"))
    parser.add_argument("--cap-mb", type=float, default=3.0, help="bytes of text per domain (MB)")
    args = parser.parse_args()
    check_requirements()
    args.out.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        n, tr, va = build_domain(domain, args.out, int(args.cap_mb * 1e6))
        print(f"{domain:6s} {n:5d} documents  train {tr / 1e6:5.2f} MB  val {va / 1e6:5.2f} MB")


if __name__ == "__main__":
    main()
