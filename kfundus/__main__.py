import sys

from kfundus.cli import main

sys.exit(main())
