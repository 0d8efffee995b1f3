"""Build llama.cpp's llama-bench, llama-perplexity and llama-completion from the llama-cpp-python sdist into the dn
cache (once; reused after), and print their folder. The peer of dn bench (dn.bench.peers).

    python scripts/build_llama_cpp.py [--version 0.3.36] [--jobs 2] [--sdist FILE.tar.gz]
"""

import argparse
import sys

from dn import cli
from dn.bench import peers


def _main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=peers.LLAMA_CPP_PYTHON, help="llama-cpp-python sdist version")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--sdist", default=None, help="an sdist already downloaded (default: pip download)")
    args = p.parse_args(argv)
    print(peers.build_llama_cpp(args.version, args.jobs, args.sdist, log=lambda m: print(m, file=sys.stderr)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(_main, sys.argv[1:]))
