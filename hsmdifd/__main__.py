import sys

from hsmdifd.daemon.cli import main

sys.exit(main())
