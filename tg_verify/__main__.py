"""Allow `python -m tg_verify`."""

from tg_verify.cli import main

raise SystemExit(main())
