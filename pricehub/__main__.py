"""``python -m pricehub``: same as ``run_server.py`` (and ``python -m pricehub tail``)."""

import sys

from pricehub.cli import main

sys.exit(main())
