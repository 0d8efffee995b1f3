"""`dn cache ls` / `dn cache rm NAME|--all`: what dn keeps in its cache folder ($DN_CACHE, else the user cache
folder), with sizes, and its removal. Every entry can go: dn makes it again when next needed."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from dn import cli
from dn.core.errors import DnError
from dn.core.files import cache_dir

# folders kept as one entry: many small files of one kind (the C kernels dn builds on first use)
WHOLE = ("native",)
WHAT = {"models": "each GGUF as a folder: -gguf its blocks, else its --dense widening", "gguf": "assembled GGUF files",
        "native": "C kernels built on first use", "residency-stores": "stores made for --max-resident",
        "peers": "llama.cpp built by nox -s peers", "bench": "dn bench's converted folders", "text": "texts"}


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn cache", description=f"What dn keeps in its cache folder ({cache_dir()}).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    sub.add_parser("ls", help="list the cache's entries with their sizes")
    rm = sub.add_parser("rm", help="remove entries (made again when next needed)")
    rm.add_argument("names", nargs="*", metavar="NAME", help="an entry as `dn cache ls` shows it (or its last part)")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    return p


def size(path: Path) -> int:
    """Bytes of a file or folder, links not followed."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def entries(root: Path) -> list[Path]:
    """Each child of the cache's folders (a whole folder for WHOLE's), and any file at the top."""
    out = []
    for top in sorted(root.iterdir()) if root.is_dir() else []:
        out += sorted(top.iterdir()) if top.is_dir() and not top.is_symlink() and top.name not in WHOLE else [top]
    return out


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ls(root: Path) -> None:
    found = [(e, size(e)) for e in entries(root)]
    print(f"{root}: {human(sum(n for _, n in found))} in {len(found)} entries" if found else f"{root}: empty")
    top = None
    for e, n in found:
        name = e.relative_to(root)
        note = f"  ({WHAT[name.parts[0]]})" if name.parts[0] in WHAT else ""
        if name.parts[0] != top and len(name.parts) > 1:
            print(f"{name.parts[0]}/{note}")
        top = name.parts[0]
        print(f"{human(n):>10}  {name}{'/' if e.is_dir() else ''}{note if len(name.parts) == 1 else ''}")


def pick(root: Path, names: list[str], every: bool) -> list[Path]:
    """The entries to remove: each NAME matches one entry, by its path under the cache or its last part."""
    have = entries(root)
    if every:
        if names:
            raise DnError("dn cache rm: give NAMEs or --all, not both")
        return have
    if not names:
        raise DnError("dn cache rm: name the entries to remove (see dn cache ls), or --all")
    out = []
    for name in names:
        hits = [e for e in have if name.rstrip("/") in (str(e.relative_to(root)), e.name)]
        if len(hits) != 1:
            why = "no such entry" if not hits else f"{len(hits)} entries match (give the path dn cache ls shows)"
            raise DnError(f"dn cache rm {name}: {why} in {root}")
        out += hits
    return out


def remove(root: Path, entry: Path) -> int:
    """Remove one entry, only if it lies inside the cache folder (a link is removed, not followed); its bytes."""
    real_root, parent = root.resolve(), entry.parent.resolve()
    if parent != real_root and real_root not in parent.parents:
        raise DnError(f"{entry}: not inside the dn cache {root}")
    n = size(entry)
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
    return n


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    root = cache_dir()
    if args.command == "ls":
        _ls(root)
        return 0
    total = 0
    for entry in pick(root, args.names, args.all):
        total += (n := remove(root, entry))
        print(f"removed {entry} ({human(n)})")
    print(f"freed {human(total)}")
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
