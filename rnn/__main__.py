"""`python -m rnn ...`: the same as the `rnn` console script."""
from .cli import main

raise SystemExit(main())
