"""A model file whose import calls sys.exit(0): audit must not pass silently."""

import sys

sys.exit(0)
