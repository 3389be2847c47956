import sys

from stargz_tui.launcher import main

sys.exit(main())
