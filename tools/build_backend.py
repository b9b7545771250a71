"""handgrad's PEP 517 build backend: setuptools', with the torch to build against pinned.

handgrad's binary works only with the torch it was compiled against. pip builds
in an isolated environment by default and installs the build requirements
there; a plain ``torch`` requirement would fetch the newest torch, compile
against it, and leave a module that cannot load next to the torch the user
already has. So the torch requirement is asked for the version the target
environment has (``torch==2.14.1``, ``torch==2.13.0+cpu``); an environment
without torch gets the newest, which the built wheel then pins, so pip
installs that same torch with it. setup.py checks the outcome again and stops
with the right command if the two still differ.

With ``--no-build-isolation`` (the README's command) these requirements are not
installed and the build uses the environment's own torch directly.
"""

import os
import sys

from setuptools import build_meta as _setuptools

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_env import target_torch_version  # noqa: E402

# Everything not overridden below is setuptools' own hook.
from setuptools.build_meta import *  # noqa: F401,F403,E402


def torch_requirement(target_version):
    """The requirement that makes an isolated build compile against `target_version`."""
    return "torch==%s" % target_version if target_version else "torch"


def _with_torch(requirements):
    return list(requirements) + [torch_requirement(target_torch_version())]


def get_requires_for_build_wheel(config_settings=None):
    return _with_torch(_setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings=None):
    return _with_torch(_setuptools.get_requires_for_build_editable(config_settings))


def get_requires_for_build_sdist(config_settings=None):
    # The sdist holds sources only: no compiler and no torch needed.
    return _setuptools.get_requires_for_build_sdist(config_settings)
