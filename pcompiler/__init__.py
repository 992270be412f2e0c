"""pcompiler: a compiler for structured pruning.

    prog = pcompiler.trace(model, example_inputs)
    prog = pcompiler.run(prog, [analyze(), L1(ratio=0.5), slim(), verify()])
"""

from pcompiler.errors import CompileError, PassError
from pcompiler.ir import Analysis, ChannelGroup, Program  # noqa: F401
from pcompiler.passes.trace import trace  # noqa: F401
from pcompiler.passmanager import make_pass, register_pass, run  # noqa: F401

__all__ = ["Analysis", "ChannelGroup", "CompileError", "PassError", "Program", "make_pass", "register_pass", "run", "trace"]
__version__ = "0.1.0"
