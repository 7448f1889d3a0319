# All metadata lives in pyproject.toml. The compiled CPU backend (csrc/) is built after installation,
# by `python -m spectraformer_fused.build` or on first use, with torch.utils.cpp_extension into a build
# cache (spectraformer_fused/ops/cpu/build_cache.py), so installing never needs torch in the build environment;
# wheels carry the C++ sources inside the package (spectraformer_fused/csrc) for that build.
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))


def _copy_csrc(target: str) -> None:
    sources = sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "*.h")))
    if sources:
        os.makedirs(target, exist_ok=True)
        for path in sources:
            shutil.copy2(path, target)


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/*.cpp and csrc/*.h into the built package."""

    def run(self):
        super().run()
        _copy_csrc(os.path.join(self.build_lib, "spectraformer_fused", "csrc"))


class SdistWithCsrc(sdist):
    """sdist that keeps the top-level csrc/ (a wheel built from the sdist then ships it as above)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        _copy_csrc(os.path.join(base_dir, "csrc"))


setup(cmdclass={"build_py": BuildPyWithCsrc, "sdist": SdistWithCsrc})
