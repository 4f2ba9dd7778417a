"""``python -m server.triton start --repository ...`` (same as ``precision-serve triton ...``)."""

import sys

from server.triton.cli import main

sys.exit(main())
