import sys

from hsmdifctl.cli import main

sys.exit(main())
