"""``python -m npformer`` is the same as the ``npformer`` command."""

import sys

from .cli import main

sys.exit(main())
