"""`python -m dinov3ds` is the `dinov3ds` command."""

import sys

from dinov3ds.cli import main

sys.exit(main())
