"""Builds the BPF object with bpf/Makefile when packaging (clang is needed only here).

An sdist or wheel carries the built object, so installing one needs no compiler.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
OBJ = ROOT / "python/runqlat/data/runqlat.bpf.o"


class BuildWithBpf(build_py):
    def run(self):
        clang = shutil.which(os.environ.get("CLANG", "clang"))
        if (ROOT / "bpf/Makefile").exists() and (clang or not OBJ.exists()):
            subprocess.run(["make", "-C", str(ROOT / "bpf")], check=True)
        elif not OBJ.exists():
            raise SystemExit("runqlat-core: no prebuilt BPF object and no bpf/ sources to build it")
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
