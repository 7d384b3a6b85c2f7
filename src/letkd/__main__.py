import sys

from letkd.cli import main

sys.exit(main())
