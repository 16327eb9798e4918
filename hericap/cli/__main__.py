"""``python -m hericap.cli``: the same as the ``hericap`` command."""

import sys

from hericap.cli import main

sys.exit(main())
