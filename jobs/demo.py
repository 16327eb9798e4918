"""The demo job: synthetic data -> Ray Train on the local (or joined) cluster -> test scores.

python jobs/demo.py [overrides]
"""

import sys

from hericap.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
