"""``python -m sdtp_core.train``: see :mod:`sdtp_core.train.run`."""

import sys

from sdtp_core.train.run import main

sys.exit(main())
