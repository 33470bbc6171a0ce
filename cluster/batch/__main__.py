"""`python -m cluster.batch`: the entry point `ray job submit` runs, the same as `ntr batch`."""

import sys

from cluster.cli import main

sys.exit(main(["batch", *sys.argv[1:]]))
