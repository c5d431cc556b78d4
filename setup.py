"""Build script for ofmu.

The Python packages are ``ofmu`` (from ``python/ofmu``) and ``ofmu_kernels`` (Triton kernels).
The compiled extension ``ofmu._C`` is added by the kernels work (see csrc/).

Install with ``pip install -e . --no-build-isolation`` so the build uses the installed torch.
"""

from setuptools import find_packages, setup

packages = ["ofmu" + p[len("ofmu") :] for p in find_packages("python", include=["ofmu", "ofmu.*"])]

setup(
    packages=packages + ["ofmu_kernels"],
    package_dir={"ofmu": "python/ofmu", "ofmu_kernels": "ofmu_kernels"},
)
