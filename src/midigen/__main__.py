import sys

from midigen.cli.main import main

sys.exit(main())
