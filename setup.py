"""Build and install Synthesis.

The Cython kernels in ``core_cy/`` are compiled when Cython and a C compiler are
available; otherwise the package installs with their pure-Python twins only, and
``core_cy.IMPLEMENTATION`` reports ``"python"``.  ``SYNTHESIS_PURE_BUILD=1`` skips
compilation on purpose.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def cython_extensions():
    if os.environ.get("SYNTHESIS_PURE_BUILD") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("synthesis: Cython not found, installing pure-Python kernels", file=sys.stderr)
        return []
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "core_cy").glob("*.pyx"))
    if not sources:
        return []
    return cythonize(
        sources,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python twins in charge instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers, ...
            print(f"synthesis: compiling kernels failed ({exc}); using pure-Python twins",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"synthesis: compiling {ext.name} failed ({exc}); using its pure-Python twin",
                  file=sys.stderr)


setup(
    name="synthesis",
    version="0.1.0",
    description="A peer-to-peer runtime for distributed agent systems",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["node", "node.*", "protocols", "protocols.*", "core_cy"]),
    package_data={"core_cy": ["*.pyx", "*.pxd"]},
    ext_modules=cython_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "pyzmq>=25",
        "msgpack>=1.0",
        "psutil>=5.9",
        "structlog>=23.1",
        "prometheus-client>=0.17",
        "xxhash>=3.0",
        # The bridges beside ZeroMQ (node/transports/quic.py, http2.py): aioquic is the
        # maintained pure-Python QUIC stack (TLS 1.3 through cryptography), h2 the
        # HTTP/2 state machine; both do what we would otherwise write by hand.
        "aioquic>=1.2",
        "h2>=4.1",
    ],
    extras_require={
        # httpx: an HTTP/2 client from outside the project, for the bridge's tests
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "hypothesis>=6.80", "pyyaml>=6.0",
                 "httpx[http2]>=0.27"],
        "bench": ["uhashring>=2.1"],
        # scripts/mutation.sh (docs/TESTING.md); pinned: mutant names and results change
        # between mutmut releases, and docs/TESTING.md lists equivalent mutants by name.
        "mutation": ["mutmut==3.8.1"],
    },
    entry_points={
        "console_scripts": [
            "synthesis-node=node.cli:node_main",
            "synthesis-ctl=node.cli:ctl_main",
        ],
    },
    zip_safe=False,
)
