"""Corpus for the tiny BitNet model: Jane Austen's six novels from Debian's r-cran-janeaustenr.

The Debian package (version pinned below, MIT licensed; the novels themselves are in the public
domain, transcribed by Project Gutenberg) stores the texts as an R lazy-load database
(data/Rdata.rdx + data/Rdata.rdb). We read it without R: the .rdx index is a gzip'd R
serialization; each object in the .rdb is a 4-byte big-endian length followed by a zlib stream of
an R serialization (character vector, one element per line of the printed book). The `rdata`
PyPI package parses R serializations.

Text clean-up: lines are re-flowed into paragraphs (blank line = paragraph break, paragraphs
separated by "\n\n"), underscores used as italics markers are dropped, runs of spaces collapsed.
"""
from __future__ import annotations

import gzip
import re
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
# Order in which the novels are concatenated (publication order).
BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
HELDOUT_BOOK = "persuasion"      # the held-out slice is the end of this novel
HELDOUT_BYTES = 48_000           # about this many bytes (whole paragraphs)


def fetch_deb(work: Path) -> Path:
    """apt-get download the pinned .deb into work/ (once) and unpack it with dpkg-deb."""
    import hashlib

    work.mkdir(parents=True, exist_ok=True)
    deb = work / f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"], cwd=work, check=True)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb}: sha256 {digest} != pinned {DEB_SHA256}")
    root = work / "deb"
    if not root.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr/lib/R/site-library/janeaustenr/data"


def read_books(data_dir: Path) -> dict[str, list[str]]:
    import rdata

    warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS"
    idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.open(data_dir / "Rdata.rdx").read()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (off, ln) in idx["variables"].items():
        blob = rdb[int(off) : int(off) + int(ln)]
        n = struct.unpack(">I", blob[:4])[0]
        raw = zlib.decompress(blob[4:])
        assert len(raw) == n
        books[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw))]
    return books


def paragraphs(lines: list[str]) -> list[str]:
    out, cur = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            p = " ".join(cur).replace("_", "")
            p = re.sub(r"\s+", " ", p).strip()
            if p:
                out.append(p)
            cur = []
    return out


def build_corpus(work: Path) -> tuple[list[str], str]:
    """Returns ([training text of each novel, in BOOKS order], heldout_text)."""
    books = read_books(fetch_deb(work))
    train_parts, heldout = [], None
    for b in BOOKS:
        paras = paragraphs(books[b])
        if b == HELDOUT_BOOK:
            k, size = len(paras), 0
            while size < HELDOUT_BYTES:
                k -= 1
                size += len(paras[k].encode()) + 2
            heldout = "\n\n".join(paras[k:]) + "\n"
            paras = paras[:k]
        train_parts.append("\n\n".join(paras))
    return train_parts, heldout
