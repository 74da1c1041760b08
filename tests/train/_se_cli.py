"""Run ``celltwin <argv>`` in this process, each SE forward pass slowed by ``$SE_SLEEP`` seconds.

Used by test_se_resume.py to kill ``celltwin embed fit`` between two checkpoints reliably.
"""

from __future__ import annotations

import os
import sys
import time

from celltwin.cli import main
from celltwin.models.state_embedding import StateEmbeddingModel

_sleep = float(os.environ.get("SE_SLEEP", "0"))
if _sleep:
    _forward = StateEmbeddingModel.forward

    def _slow_forward(self, *args, **kwargs):
        time.sleep(_sleep)
        return _forward(self, *args, **kwargs)

    StateEmbeddingModel.forward = _slow_forward

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
