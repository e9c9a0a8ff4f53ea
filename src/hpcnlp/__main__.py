import sys

from hpcnlp.cli import main

sys.exit(main())
