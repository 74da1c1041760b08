"""Shared column names, labels and keys used across celltwin.

Every module reads these instead of spelling the strings again, so a dataset with other
column names is handled by passing different values, never by editing code.
"""

from __future__ import annotations

__all__ = [
    "BATCH_COL",
    "COMBO_SEP",
    "CONTEXT_COL",
    "CONTROL_LABEL",
    "EMBED_KEY",
    "GUIDE_COL",
    "PERT_COL",
    "SIM_UNS_KEY",
]

PERT_COL = "target_gene"  # obs column with the perturbed gene (VCC convention)
CONTROL_LABEL = "non-targeting"  # label of control (basal) cells in PERT_COL
BATCH_COL = "batch"  # obs column with the technical batch (gem group)
CONTEXT_COL = "context"  # obs column with the biological context (cell type / line / condition)
GUIDE_COL = "guide_id"  # obs column with the sgRNA id, when present
EMBED_KEY = "X_state"  # obsm key written by `celltwin embed transform`
SIM_UNS_KEY = "celltwin_sim"  # uns key holding the simulator's ground truth
COMBO_SEP = "+"  # separator of combinatorial perturbations, e.g. "A+B"
