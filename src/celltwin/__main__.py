import sys

from celltwin.cli import main

sys.exit(main())
