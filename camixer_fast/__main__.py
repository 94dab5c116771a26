import sys

from camixer_fast.cli import main

sys.exit(main())
