"""Package build hook: ship the native kernels' C source in the package and, when a C compiler is
present, compile it once at build time (`pip install .`). Without a compiler the build still
succeeds: moeinf compiles on first use, or falls back to torch (src/moeinf/kernels/build.py).
Project metadata lives in pyproject.toml.
"""

import ast
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
SOURCE = HERE / "native" / "moeinf_kernels.c"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_constants() -> dict:
    """FLAGS, LIBS and LIBRARY_NAME as moeinf/kernels/build.py defines them (one place of truth; read
    with ast because importing the package would need torch, absent from an isolated build env)."""
    tree = ast.parse((HERE / "src" / "moeinf" / "kernels" / "build.py").read_text())
    wanted = {"FLAGS", "LIBS", "LIBRARY_NAME"}
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in wanted
    }


class BuildWithKernels(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "moeinf" / "kernels"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE, dest / SOURCE.name)
        consts = _build_constants()
        cc = _compiler()
        if cc is None:
            print("moeinf: no C compiler: native kernels will be compiled on first use or skipped")
            return
        library = dest / consts["LIBRARY_NAME"]
        cmd = [cc, *consts["FLAGS"], "-o", str(library), str(SOURCE), *consts["LIBS"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # not fatal: the run-time build or torch takes over
            print(f"moeinf: building the native kernels failed, torch will be used:\n{proc.stderr}")


setup(cmdclass={"build_py": BuildWithKernels})
