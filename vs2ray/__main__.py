"""`python -m vs2ray <command>` (see vs2ray.cli)."""

from vs2ray.cli import main

raise SystemExit(main())
