"""Tensor ops shared by nets and losses: stateless, no weights."""
from op_util.ops import adaptive_avg_pool, l2_normalize, pool_to_match, flatten_per_sample

__all__ = ["adaptive_avg_pool", "l2_normalize", "pool_to_match", "flatten_per_sample"]
