"""celltwin: virtual cells for Perturb-seq.

Importing the package is cheap and never imports torch; heavy modules load on use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
