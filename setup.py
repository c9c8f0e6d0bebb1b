"""The packages the wheel carries; everything else about the project is in pyproject.toml.

Every package under jgc/ is found (a new sub-package of jgc/_src is carried without an
entry to add), and examples/ is installed as jgc.examples (pyproject.toml maps the
directory), for ``jgc demo``. The top-level module ``pytest_jgc`` is the pytest plugin's
entry point: outside the package, so that pytest loading it in every session imports
neither jgc nor JAX. pyproject.toml alone cannot say both: its package finder
names a package by its directory, and examples/ sits outside jgc/.
"""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["jgc", "jgc.*"]) + ["jgc.examples"], py_modules=["pytest_jgc"])
