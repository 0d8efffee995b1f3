"""`python -m dn.bench --one JOB`: how the runner starts each record's process (dn.bench.runner.run_job)."""

import sys

from dn.bench import main

if __name__ == "__main__":  # importing it (a walk over dn's modules) runs nothing
    sys.exit(main())
