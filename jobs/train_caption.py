"""Train a captioner on Ray, as the seed's ``train_caption.py``.

    python jobs/train_caption.py exp.name=NAME optimizer.batch_size=32 ... [preset=demo]

Also submittable with ``ray job submit --working-dir . -- python jobs/train_caption.py ...``.
"""

import sys

from hericap.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
