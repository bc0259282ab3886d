"""Fidelity benchmark (same as ``currsearch benchmark fidelity``; see currsearch/cli/benchmark.py).

    python benchmarks/fidelity.py [CONFIG] --estimators reference,additive,fut1,fut2,fut1-hvp --out runs/fidelity
"""

import sys

from currsearch.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "fidelity"] + sys.argv[1:]))
