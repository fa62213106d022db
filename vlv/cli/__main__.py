import sys

from vlv.cli import main

sys.exit(main())
