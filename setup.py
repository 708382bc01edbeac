"""The one compiled part: rollwire.features._simd (AVX-512 VBMI / AVX2 byte shuffles, src/rollwire/features/_simd.c).

Optional: where it does not build (no C compiler, not x86-64 with gcc or clang), the install goes on
without it and rollwire takes its numpy and PIL paths, the same bytes. Everything else is in
pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rollwire.features._simd", ["src/rollwire/features/_simd.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
