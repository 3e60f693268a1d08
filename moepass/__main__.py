"""`python -m moepass`: the `moepass` command line."""

import sys

from moepass.cli import main

sys.exit(main())
