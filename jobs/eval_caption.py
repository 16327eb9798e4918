"""Decode and score a split with a checkpoint, as the seed's ``eval_caption.py``.

python jobs/eval_caption.py split='test' exp.checkpoint=PATH
"""

import sys

from hericap.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
