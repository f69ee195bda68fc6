"""``python -m ncfast``: the command line."""
import sys

from ncfast.cli import main

sys.exit(main())
