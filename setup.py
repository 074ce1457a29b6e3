"""Maps the top-level folders into the `batonserve` namespace, subpackages included."""

from setuptools import find_packages, setup

TOP = ("cluster", "workers", "kernels", "proto")
packages = [f"batonserve.{top}" for top in TOP]
packages += [f"batonserve.{top}.{sub}" for top in TOP for sub in find_packages(top)]
setup(packages=packages, package_dir={f"batonserve.{top}": top for top in TOP})
