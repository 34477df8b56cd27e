"""Build script: metadata lives in setup.cfg.

``find_packages`` cannot see ``twisted.plugins`` (it deliberately has no
``__init__.py``: one would shadow Twisted's own plugins), so it is named here.
The warning "package init file 'twisted/plugins/__init__.py' not found" is expected.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["teltonika", "teltonika.*"]), "twisted.plugins"])
