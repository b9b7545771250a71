"""Whether handgrad's compiled module can load into the torch installed now.

A C++ extension works only with the torch it was compiled against: with
another one the module fails to load with a mangled "undefined symbol" (or,
worse, loads and misbehaves). setup.py records the build's torch in
``handgrad/_build_config.py``; this module compares it with the running torch
*before* the binary is loaded and turns a difference into one sentence that
says how to fix it. It imports nothing compiled, so the command line can
still answer ``--help``, ``--version`` and ``info`` when the binary cannot load.
"""

import os
import sys

try:
    from . import _build_config as build
except ImportError:  # a build from before the configuration was recorded
    build = None


def _release(version):
    return version.split("+", 1)[0]


def _rebuild_command():
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(source, "setup.py")):  # an editable install or a checkout
        return "cd %s && pip install --no-build-isolation -e ." % source
    return "pip install --no-build-isolation --force-reinstall --no-deps <handgrad's source folder>"


def _describe(torch_version, cuda):
    return "torch %s (%s)" % (torch_version, "CUDA %s" % cuda if cuda else "CPU-only")


def torch_mismatch(torch_version, torch_cuda, recorded=None):
    """One sentence saying why a handgrad built as `recorded` (default: this
    installation's _build_config) cannot run with the given torch, or None.

    The binary must have been compiled against the same torch release; if it
    holds CUDA kernels, torch must also be a build for the same CUDA version.
    A CPU-only handgrad runs with either variant (CPU or CUDA) of its release.
    """
    recorded = build if recorded is None else recorded
    if recorded is None:
        return None
    built_cuda = recorded.torch_cuda if recorded.cuda_kernels else None
    same_release = _release(recorded.torch_version) == _release(torch_version)
    same_cuda = not recorded.cuda_kernels or recorded.torch_cuda == torch_cuda
    if same_release and same_cuda:
        return None
    return ("handgrad %s was built for %s, but %s is installed: install that torch "
            "(pip install torch==%s), or rebuild handgrad against this one (%s)"
            % (recorded.version, _describe(_release(recorded.torch_version), built_cuda),
               _describe(torch_version, torch_cuda), _release(recorded.torch_version),
               _rebuild_command()))


def missing_torch_message():
    wanted = "torch==%s" % _release(build.torch_version) if build is not None else "torch"
    return "handgrad needs PyTorch, which is not installed here: pip install %s" % wanted


def load_failure_message(error):
    """One sentence for a compiled module that failed to load although the
    recorded torch matches (a broken or partial build)."""
    import importlib.util

    if importlib.util.find_spec(__package__ + "._C") is None:
        reason = "handgrad._C is missing: the build did not finish or was not installed"
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return "handgrad's compiled module could not be loaded (%s); rebuild it: %s" % (
        reason, _rebuild_command())


def loading_for_the_command_line():
    """Whether this import runs the `handgrad` command (``python -m handgrad`` or the
    console script): then a torch problem must not stop ``--help`` or ``info``."""
    argv0 = sys.argv[0] if sys.argv else ""
    # While `python -m handgrad` imports the package, sys.argv[0] is still "-m".
    return argv0 == "-m" or os.path.basename(argv0) == "handgrad"
