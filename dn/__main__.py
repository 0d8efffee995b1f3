"""`python -m dn`: the `dn` command."""

import sys

from dn.cli import main

if __name__ == "__main__":
    sys.exit(main())
