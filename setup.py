"""Build hook for the one C extension; everything else is declared in pyproject.toml.

`gateway._simkernel` (the locality band's screening pass, see gateway/_simkernel.c) is optional:
where no C compiler is available the build goes on without it and gateway/band.py uses its
numpy path, with the same decisions, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway._simkernel",
            sources=["gateway/_simkernel.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
