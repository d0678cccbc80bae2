import sys

from raypt.cli import main

sys.exit(main())
