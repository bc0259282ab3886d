"""Build the embedded default text corpus of ``currsearch``.

The corpus has four clearly different English-language domains, all taken
from public-domain or permissively licensed texts that are available locally
(Debian packages and the running Python interpreter), so the build needs no
network access:

``bible``
    The King James Bible (1611), Debian package ``bible-kjv-text`` (text data
    in the compressed format of the Bible Retrieval System) read through the
    ``bible`` program of package ``bible-kjv``.  One document = one chapter.
``devil``
    Ambrose Bierce, *The Devil's Dictionary* (1911), Debian package
    ``dict-devil`` (dictd format).  One document = one dictionary entry.
``jargon``
    The Jargon File 4.4.7 (The Jargon Lexicon), Debian package
    ``dict-jargon`` (dictd format).  One document = one dictionary entry.
``python``
    The top-level ``*.py`` modules of the running interpreter's standard
    library (``sysconfig.get_paths()["stdlib"]``; PSF License v2).  One
    document = one file, or a chunk of at most 8192 characters of a longer
    file, cut on blank-line boundaries.

Selection: per domain at most ``MAX_DOMAIN_CHARS`` characters (train and
validation together).  Where a source is larger, an evenly spaced subset of
its documents (whole files for ``python``) in canonical source order is kept;
see ``evenly_spaced``.  Split: a document goes to validation iff
``int(sha256(doc_id)[:8 bytes]) % 100 < 10``.

Output: ``train.jsonl`` and ``validation.jsonl``, one JSON object per line,
``{"text": str, "domain": str, "source": str, "doc_id": str}``, UTF-8,
sorted by domain, then canonical source order.  The build is deterministic:
the same package versions and Python version give byte-identical files.

Rebuild (from the repository root)::

    apt-get install bible-kjv bible-kjv-text dict-jargon dict-devil
    python -m currsearch.corpus.build            # writes next to this file
    python -m currsearch.corpus.build --out DIR  # writes elsewhere

Only the Python standard library is used.  ``DATA_CARD.md`` next to this
file documents sources, licences, sizes and checksums of the committed build.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

# --------------------------------------------------------------------------
# Constants (changing any of them changes the corpus).

MAX_DOMAIN_CHARS = 1_000_000    # text characters per domain, both splits
PY_CHUNK_CHARS = 8192           # max characters of one python document
VALIDATION_PERCENT = 10         # share of documents in validation
MIN_VALIDATION_CHARS = 25_000   # required validation text per domain
MIN_DOMAIN_CHARS = 250_000      # required text per domain
MAX_TOTAL_BYTES = 4_500_000     # both jsonl files together
PINNED_PYTHON = "3.11.7"        # interpreter the committed build used

DOMAINS = ("bible", "devil", "jargon", "python")  # output order

BIBLE_DATA = "/usr/lib/bible.data"
DICTD_DIR = "/usr/share/dictd"

BIBLE_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua",
    "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
    "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts",
    "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)


class BuildError(RuntimeError):
    """Raised when an input is missing or the result violates a constraint."""


# --------------------------------------------------------------------------
# Helpers.

def normalize(text: str) -> str:
    """Unify line ends, strip trailing whitespace of every line and of the
    document, and drop leading blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def missing(what: str, packages: str) -> BuildError:
    return BuildError(
        f"{what} not found. Install it with:\n"
        f"    apt-get install {packages}"
    )


def package_version(package: str) -> str:
    """Installed Debian version of ``package`` (for the report only)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "not installed"


def evenly_spaced(docs: list, budget: int, size=lambda d: len(d["text"])):
    """Deterministic, evenly spaced subset of ``docs`` (kept in order).

    With ``T`` the total size: if ``T <= budget`` everything is kept.
    Otherwise, for ``k = 0, 1, 2, ...`` let ``b = budget * (1000 - k) // 1000``
    and keep item ``i`` (0-based) iff ``(i + 1) * b // T > i * b // T``
    (every ``T / b``-th item, exact integer arithmetic); the first ``k``
    whose kept total is at most ``budget`` wins.
    """
    total = sum(size(d) for d in docs)
    if total <= budget:
        return list(docs)
    for k in range(1000):
        b = budget * (1000 - k) // 1000
        kept = [d for i, d in enumerate(docs)
                if ((i + 1) * b) // total > (i * b) // total]
        if sum(size(d) for d in kept) <= budget:
            return kept
    raise BuildError("no subset fits the budget")


def is_validation(doc_id: str) -> bool:
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


# --------------------------------------------------------------------------
# bible: King James Bible via the ``bible`` program.

_CHAPTER_RE = re.compile(r"^(\S.*) (\d+)$")
_VERSE_RE = re.compile(r"^  (\d+) (.*)$")


def load_bible() -> list[dict]:
    if not os.path.isfile(BIBLE_DATA):
        raise missing(f"KJV text data {BIBLE_DATA}",
                      "bible-kjv-text bible-kjv")
    exe = shutil.which("bible")
    if exe is None:
        raise missing("The `bible` program", "bible-kjv bible-kjv-text")
    with tempfile.TemporaryDirectory() as tmp:  # no stray bible.data in cwd
        proc = subprocess.run(
            [exe, "-p", os.path.dirname(BIBLE_DATA), "-l", "100000",
             "Gen1:1-Rev22:21"],
            capture_output=True, cwd=tmp, check=False,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
        )
    if proc.returncode != 0 or not proc.stdout:
        raise BuildError("`bible` failed: "
                         + proc.stderr.decode("utf-8", "replace"))
    out = proc.stdout.decode("utf-8")

    chapters: list[tuple[str, int, list[str]]] = []
    for line in out.split("\n"):
        if not line.strip():
            continue
        m = _VERSE_RE.match(line)
        if m:
            if not chapters:
                raise BuildError(f"bible: verse before heading: {line!r}")
            chapters[-1][2].append(f"{m.group(1)} {m.group(2)}")
            continue
        m = _CHAPTER_RE.match(line)
        if not m:
            raise BuildError(f"bible: unexpected line {line!r}")
        chapters.append((m.group(1), int(m.group(2)), []))

    books = list(dict.fromkeys(book for book, _, _ in chapters))
    if tuple(books) != BIBLE_BOOKS or len(chapters) != 1189:
        raise BuildError("bible: unexpected book/chapter structure "
                         f"({len(books)} books, {len(chapters)} chapters)")
    verses = sum(len(v) for _, _, v in chapters)
    if verses != 31102:
        raise BuildError(f"bible: expected 31102 verses, got {verses}")

    docs = []
    for book, chapter, lines in chapters:
        number = BIBLE_BOOKS.index(book) + 1
        slug = book.lower().replace(" ", "-")
        docs.append({
            "text": normalize(f"{book} {chapter}\n\n" + "\n".join(lines)),
            "domain": "bible",
            "source": f"bible-kjv-text:{book} {chapter}",
            "doc_id": f"bible/{number:02d}-{slug}/{chapter:03d}",
        })
    return docs


# --------------------------------------------------------------------------
# jargon, devil: dictd databases.

_B64 = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        "0123456789+/")
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def dictd_number(field: str) -> int:
    """Decode a dictd index number (big-endian base 64, no padding)."""
    value = 0
    for char in field:
        value = value * 64 + _B64_VALUE[char]
    return value


def load_dictd(name: str, package: str, domain: str,
                headword_from_text: bool) -> list[dict]:
    """One document per dictd entry, in data-file order.

    The source label is the entry's first line (``headword_from_text``) or
    its index headwords, upper-cased and joined by " / ".
    """
    index_path = os.path.join(DICTD_DIR, f"{name}.index")
    dict_path = os.path.join(DICTD_DIR, f"{name}.dict.dz")
    for path in (index_path, dict_path):
        if not os.path.isfile(path):
            raise missing(f"dictd file {path}", package)
    with gzip.open(dict_path, "rb") as fh:  # dictzip is gzip-compatible
        data = fh.read()

    spans: dict[tuple[int, int], list[str]] = {}  # (offset, length) -> words
    with open(index_path, "r", encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            headword, offset, length = line.split("\t")[:3]
            if re.sub(r"[^a-z0-9]", "", headword.lower()).startswith(
                    "00database"):
                continue                      # dictd metadata entries
            key = (dictd_number(offset), dictd_number(length))
            spans.setdefault(key, []).append(headword)

    docs = []
    end = 0
    for ordinal, (offset, length) in enumerate(sorted(spans)):
        if offset < end or offset + length > len(data):
            raise BuildError(f"{name}: overlapping or out-of-range entry")
        end = offset + length
        text = normalize(data[offset:offset + length].decode("utf-8"))
        if not text or text.startswith("00-database"):
            continue
        if headword_from_text:
            label = text.split("\n", 1)[0].strip()
        else:
            label = " / ".join(w.upper() for w in spans[(offset, length)])
        docs.append({
            "text": text,
            "domain": domain,
            "source": f"{package}:{label}",
            "doc_id": f"{domain}/{ordinal:04d}",
        })
    return docs


# --------------------------------------------------------------------------
# python: standard-library modules of the running interpreter.

def stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib):
        raise BuildError(f"Python stdlib directory {stdlib} not found")
    names = sorted(n for n in os.listdir(stdlib)
                   if n.endswith(".py")
                   and not n.startswith("_sysconfigdata")  # generated
                   and os.path.isfile(os.path.join(stdlib, n)))
    if not names:
        raise BuildError(f"no *.py files in {stdlib}")
    return [os.path.join(stdlib, n) for n in names]


def split_chunks(text: str, limit: int = PY_CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into chunks of at most ``limit`` characters.

    Cuts are made after blank lines; a paragraph (run of non-blank lines)
    longer than ``limit`` is cut between lines, and a longer line is cut
    hard.  Chunks are normalized (no leading/trailing blank lines).
    """
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    para: list[str] = []
    for line in text.split("\n"):
        para.append(line + "\n")
        if not line:               # blank line closes a paragraph
            pieces.append("".join(para))
            para = []
    if para:
        pieces.append("".join(para))

    units: list[str] = []          # each at most ``limit`` characters
    for piece in pieces:
        if len(piece) <= limit:
            units.append(piece)
            continue
        for line in piece.splitlines(keepends=True):
            while len(line) > limit:
                units.append(line[:limit])
                line = line[limit:]
            units.append(line)

    chunks: list[str] = []
    current = ""
    for unit in units:
        if current and len(current) + len(unit) > limit:
            chunks.append(current)
            current = ""
        current += unit
    if current:
        chunks.append(current)
    return [c for c in (normalize(c) for c in chunks) if c]


def load_python() -> list[list[dict]]:
    """Return one list of chunk documents per stdlib file."""
    version = platform.python_version()
    files = []
    for path in stdlib_files():
        name = os.path.basename(path)
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = normalize(text)
        if not text:
            continue
        chunks = split_chunks(text)
        files.append([{
            "text": chunk,
            "domain": "python",
            "source": f"cpython-{version}:Lib/{name}"
                      + (f" (part {i + 1}/{len(chunks)})"
                         if len(chunks) > 1 else ""),
            "doc_id": f"python/{name}/{i:03d}",
        } for i, chunk in enumerate(chunks)])
    return files


# --------------------------------------------------------------------------
# Assembly.

def collect() -> dict[str, list[dict]]:
    devil = load_dictd("devil", "dict-devil", "devil", False)
    jargon = load_dictd("jargon", "dict-jargon", "jargon", True)
    corpus = {
        "bible": evenly_spaced(load_bible(), MAX_DOMAIN_CHARS),
        "devil": evenly_spaced(devil, MAX_DOMAIN_CHARS),
        "jargon": evenly_spaced(jargon, MAX_DOMAIN_CHARS),
    }
    files = evenly_spaced(load_python(), MAX_DOMAIN_CHARS,
                          size=lambda f: sum(len(d["text"]) for d in f))
    corpus["python"] = [doc for f in files for doc in f]
    for domain in DOMAINS:
        ids = [d["doc_id"] for d in corpus[domain]]
        if len(set(ids)) != len(ids):
            raise BuildError(f"{domain}: duplicate doc_id")
    return corpus


def dump_line(doc: dict) -> str:
    line = json.dumps(
        {"text": doc["text"], "domain": doc["domain"],
         "source": doc["source"], "doc_id": doc["doc_id"]},
        ensure_ascii=False,
    )
    # Escape characters that some line splitters treat as line breaks.
    for char in ("\u0085", "\u2028", "\u2029"):
        line = line.replace(char, "\\u%04x" % ord(char))
    return line + "\n"


def build(out_dir: str) -> dict:
    corpus = collect()
    splits = {"train": [], "validation": []}
    stats = {}
    for domain in DOMAINS:
        st = stats[domain] = {s: {"docs": 0, "chars": 0, "bytes": 0}
                              for s in splits}
        for doc in corpus[domain]:
            split = "validation" if is_validation(doc["doc_id"]) else "train"
            line = dump_line(doc)
            splits[split].append(line)
            st[split]["docs"] += 1
            st[split]["chars"] += len(doc["text"])
            st[split]["bytes"] += len(line.encode("utf-8"))
        total = st["train"]["chars"] + st["validation"]["chars"]
        if total < MIN_DOMAIN_CHARS:
            raise BuildError(f"{domain}: only {total} characters")
        if total > MAX_DOMAIN_CHARS:
            raise BuildError(f"{domain}: {total} characters over budget")
        if st["validation"]["chars"] < MIN_VALIDATION_CHARS:
            raise BuildError(f"{domain}: only {st['validation']['chars']} "
                             "validation characters")

    payload = {s: "".join(lines).encode("utf-8")
               for s, lines in splits.items()}
    total_bytes = sum(len(p) for p in payload.values())
    if total_bytes > MAX_TOTAL_BYTES:
        raise BuildError(f"output is {total_bytes} bytes, over the cap")

    os.makedirs(out_dir, exist_ok=True)
    checksums = {}
    for split, data in payload.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        checksums[split] = hashlib.sha256(data).hexdigest()
    return {"stats": stats, "bytes": total_bytes, "sha256": checksums}


def report(result: dict, out_dir: str) -> None:
    print(f"{'domain':<8} {'split':<10} {'docs':>6} {'chars':>9} "
          f"{'bytes':>9}")
    for domain in DOMAINS:
        for split, st in result["stats"][domain].items():
            print(f"{domain:<8} {split:<10} {st['docs']:>6} "
                  f"{st['chars']:>9} {st['bytes']:>9}")
    print(f"total bytes on disk: {result['bytes']}")
    for split, digest in result["sha256"].items():
        print(f"sha256 {split}.jsonl: {digest}")
    print("inputs: " + ", ".join(
        f"{p} {package_version(p)}" for p in
        ("bible-kjv-text", "bible-kjv", "dict-jargon", "dict-devil"))
        + f", python {platform.python_version()}")
    print(f"written to {os.path.abspath(out_dir)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the default currsearch text corpus "
                    "(train.jsonl, validation.jsonl).")
    parser.add_argument(
        "--out", default=os.path.dirname(os.path.abspath(__file__)),
        help="output directory (default: the directory of build.py)")
    args = parser.parse_args(argv)
    if platform.python_version() != PINNED_PYTHON:
        print(f"warning: running Python {platform.python_version()}; the "
              f"committed corpus was built with {PINNED_PYTHON}, so the "
              "python domain will differ", file=sys.stderr)
    try:
        result = build(args.out)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
