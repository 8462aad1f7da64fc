"""Builds the package with gRPC stubs generated from the repository's protos
(proto/psa/v1/generation.proto) at build time, so they always match."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
GEN = os.path.join(HERE, "psa_serve", "_gen")


class BuildWithStubs(build_py):
    def run(self):
        from grpc_tools import protoc  # a build requirement (pyproject.toml)

        os.makedirs(os.path.join(GEN, "psa", "v1"), exist_ok=True)
        for d in (GEN, os.path.join(GEN, "psa"), os.path.join(GEN, "psa", "v1")):
            open(os.path.join(d, "__init__.py"), "a").close()
        # Stubs import each other as "psa.v1.*": generate under _gen, which
        # the package puts on its import path.
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={GEN}", f"--grpc_python_out={GEN}",
                os.path.join(PROTO_ROOT, "psa", "v1", "generation.proto")]
        if protoc.main(args) != 0:
            sys.exit("protoc failed on generation.proto")
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
