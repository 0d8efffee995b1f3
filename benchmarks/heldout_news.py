"""Held-out news text for residency quality (not in ../shared, as a new user's text would be): the Lee corpus of
ABC (Australian) news articles that gensim ships as test data (gensim/test/test_data/lee_background.cor, 300
articles, about 75,000 tokens of the default model). Fetched with `pip download gensim --no-deps` from the
package registry and extracted into the dn cache; prints the file's path. Nothing is copied into the repo.

    python benchmarks/heldout_news.py            # -> ~/.cache/dn/text/lee_background.txt
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dn.core.files import atomic_file, cache_dir  # noqa: E402

MEMBER = "gensim/test/test_data/lee_background.cor"


def fetch() -> Path:
    out = cache_dir() / "text" / "lee_background.txt"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "gensim==4.4.0", "--no-deps", "--only-binary=:all:",
                        "-q", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("gensim-*.whl"))
        text = zipfile.ZipFile(wheel).read(MEMBER).decode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp_out:
        tmp_out.write_text(text)
    return out


if __name__ == "__main__":
    print(fetch())
