import sys

from fm_policy.cli import main

sys.exit(main())
