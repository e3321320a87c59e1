"""Build script: maps kernels/ to spice_fast.kernels and compiles the C++ extensions in csrc/.

Metadata lives in pyproject.toml. Adding a native extension is one line in EXTENSIONS:
(module name, list of sources under csrc/, whether it uses OpenMP). Sources are compiled as C++17
with pybind11.
"""

from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import find_packages, setup

# Compile the source files of each extension in parallel, on every core unless SPICE_FAST_BUILD_JOBS says.
ParallelCompile("SPICE_FAST_BUILD_JOBS", default=0).install()

EXTENSIONS: list[tuple[str, list[str], bool]] = [  # (name, sources, uses OpenMP)
    ("spice_fast._matcher", glob("csrc/matcher/*.cpp") + ["csrc/bindings.cpp"], False),
    ("spice_fast._cpu_attention", glob("csrc/attention/*.cpp"), True),
    # decode_layers runs the paged attention kernel too, so it is compiled into both modules
    ("spice_fast._cpu_ops", glob("csrc/ops/*.cpp") + ["csrc/attention/paged_decode.cpp"], True),
]


def _extension(name: str, sources: list[str], openmp: bool) -> Pybind11Extension:
    ext = Pybind11Extension(
        name,
        sorted(sources),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-Wno-psabi"],  # -Wno-psabi: vector values only cross inlined calls
    )
    ext.uses_openmp = openmp
    return ext


class _BuildExt(build_ext):
    """Builds the OpenMP extensions with -fopenmp when the compiler takes it: their CPU kernels then run
    on torch's own OpenMP threads (see csrc/parallel.h). A compiler without OpenMP (Apple clang without
    libomp) builds them single-threaded instead of failing."""

    def build_extensions(self):
        wanted = [ext for ext in self.extensions if getattr(ext, "uses_openmp", False)]
        if wanted and has_flag(self.compiler, "-fopenmp"):
            for ext in wanted:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        elif wanted:
            self.warn("the C++ compiler does not take -fopenmp: the CPU kernels will run on one thread")
        super().build_extensions()


setup(
    packages=find_packages(include=["spice_fast", "spice_fast.*"]) + ["spice_fast.kernels"],
    package_dir={"spice_fast.kernels": "kernels"},
    ext_modules=[_extension(*ext) for ext in EXTENSIONS],
    cmdclass={"build_ext": _BuildExt},
    zip_safe=False,
)
