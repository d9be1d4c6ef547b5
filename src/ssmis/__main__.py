"""`python -m ssmis`, also what `torchrun -m ssmis train ...` runs."""

from ssmis.cli import main

raise SystemExit(main())
