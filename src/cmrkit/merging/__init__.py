"""Merge rules on low-rank updates, in full space and in core space."""

from cmrkit.merging.core_space import (
    CoreBasis,
    core_basis,
    merge_core_space,
    merge_full,
    merge_in_core,
)
from cmrkit.merging.rules import (
    MERGE_RULES,
    check_params,
    dare,
    dare_ties,
    iso,
    merge,
    rule_params,
    task_arithmetic,
    ties,
    tsv,
)

__all__ = [
    "MERGE_RULES",
    "CoreBasis",
    "check_params",
    "core_basis",
    "dare",
    "dare_ties",
    "iso",
    "merge",
    "merge_core_space",
    "merge_full",
    "merge_in_core",
    "rule_params",
    "task_arithmetic",
    "ties",
    "tsv",
]
