"""Build script: maps kernels/ to spice_fast.kernels and compiles the C++ extensions in csrc/.

Metadata lives in pyproject.toml. Adding a native extension is one line in EXTENSIONS:
(module name, list of sources under csrc/, whether it uses OpenMP). Sources are compiled as C++17
with pybind11.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

EXTENSIONS: list[tuple[str, list[str], bool]] = [  # (name, sources, uses OpenMP)
    ("spice_fast._matcher", glob("csrc/matcher/*.cpp") + ["csrc/bindings.cpp"], False),
    ("spice_fast._cpu_attention", glob("csrc/attention/*.cpp"), True),
    ("spice_fast._cpu_ops", glob("csrc/ops/*.cpp"), True),
]


def _extension(name: str, sources: list[str], openmp: bool) -> Pybind11Extension:
    # OpenMP: the CPU kernels run on torch's own OpenMP threads (see csrc/parallel.h).
    omp = ["-fopenmp"] if openmp else []
    return Pybind11Extension(
        name,
        sorted(sources),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-Wno-psabi", *omp],  # -Wno-psabi: vector values only cross inlined calls
        extra_link_args=omp,
    )


setup(
    packages=find_packages(include=["spice_fast", "spice_fast.*"]) + ["spice_fast.kernels"],
    package_dir={"spice_fast.kernels": "kernels"},
    ext_modules=[_extension(*ext) for ext in EXTENSIONS],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
