"""``python -m server.launcher start --repository ...`` (same as ``precision-serve triton ...``)."""

import sys

from server.launcher.cli import main

sys.exit(main())
