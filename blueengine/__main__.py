import sys

from blueengine.cli import main

sys.exit(main())
