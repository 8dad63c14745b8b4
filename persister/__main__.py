import sys

from persister.cli import main

sys.exit(main())
