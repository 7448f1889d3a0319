# All metadata lives in pyproject.toml. The compiled CPU backend (csrc/) is built just-in-time on
# first use with torch.utils.cpp_extension, so installing never needs torch in the build environment.
from setuptools import setup

setup()
