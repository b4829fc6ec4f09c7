"""`python -m vs2ray.sweep [--config YAML] ...`: the sweep's entry point, the same as `python -m vs2ray sweep`.

It only starts the command line; the sweep itself (search space, config checks, Tuner) is `vs2ray.tuning`,
and nothing imports this module.
"""

from __future__ import annotations

import sys

from vs2ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
