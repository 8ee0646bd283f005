"""`python -m ptst`: the same as the `ptst` command."""

import sys

from ptst.commands.cli import main

sys.exit(main())
