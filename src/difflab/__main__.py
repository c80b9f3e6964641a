"""`python -m difflab ...`: the `difflab` command, as torchrun launches it (`torchrun --nproc-per-node 2 -m difflab
train ...`)."""

import sys

from difflab.cli.main import main

sys.exit(main())
