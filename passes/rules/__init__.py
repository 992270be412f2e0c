"""Op rules, one registry (base.py) keyed by fx target; importing this package registers them.

layers: conv, linear, norms, embeddings. elementwise: activations, arithmetic, reductions,
pooling. shape: reshapes, permutes, cat/split, indexing. attention: matmul, einsum, sdpa.
"""

from pcompiler.passes.rules import attention, elementwise, layers, shape  # noqa: F401
from pcompiler.passes.rules.base import lookup, rewriter, rule  # noqa: F401
