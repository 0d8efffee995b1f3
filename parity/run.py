"""The parity suite's entry, `python -m parity.run` (as `dn parity`; nox -s parity runs `dn parity`). The
comparison is backend-neutral and lives in dn (dn/parity.py), so dn never imports this package."""

import sys

from dn.parity import PROMPTS, compare, main, rel_err, run_parity

__all__ = ["PROMPTS", "compare", "main", "rel_err", "run_parity"]

if __name__ == "__main__":
    sys.exit(main())
