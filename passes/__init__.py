"""The passes. Importing this package registers every pass by name (see pcompiler.passmanager).

One file per pass: trace (builds the Program; `pcompiler.trace` is its entry point), analyze, the methods (l1, random), slim, verify.
`select` holds the selection rules the methods share; `rules/` the op rules of analyze/slim.
"""

from pcompiler.passes import analyze, l1, random, slim, trace, verify  # noqa: F401
