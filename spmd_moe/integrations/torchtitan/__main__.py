"""python -m spmd_moe.integrations.torchtitan --parity HF_DIR GEN.pt OUT.pt (the parity trainer)."""

import sys

from spmd_moe.integrations.torchtitan import parity_trainer_main

if sys.argv[1:2] == ["--parity"]:
    parity_trainer_main(sys.argv[2:])
else:
    raise SystemExit("usage: python -m spmd_moe.integrations.torchtitan --parity HF_DIR GEN.pt OUT.pt")
