import sys

from hsmdifd.cli import main

sys.exit(main())
