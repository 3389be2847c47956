import sys

from stargz_tui.cli import main

sys.exit(main())
