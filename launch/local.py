#!/usr/bin/env python3
"""Start N gptjax processes on this machine; same as `gptjax launch` (see gptjax/tools/launch.py).

python launch/local.py --nproc 2 --devices-per-proc 4 -- train configs/debug.yaml mesh.fsdp=2
"""

import sys

from gptjax.tools.launch import main

if __name__ == "__main__":
    sys.exit(main())
