"""Package build hook: ship the C sources in the package and, when a C compiler is present, compile
them once at build time (`pip install .`): the native kernels (src/moeinf/kernels/build.py) and the
cache policies' cores (src/moeinf/runtime/policy_core.py, a CPython extension). Without a
compiler the build still succeeds: moeinf compiles on first use, or falls back to torch and to the
Python policies. Project metadata lives in pyproject.toml.
"""

import ast
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
SOURCE = HERE / "native" / "moeinf_kernels.c"
POLICY_CORE = HERE / "native" / "moeinf_policy_core.c"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_constants(module: str = "kernels/build.py", wanted=("FLAGS", "LIBS", "LIBRARY_NAME")) -> dict:
    """Constants as a module of the package defines them (one place of truth; read with ast because
    importing the package would need torch, absent from an isolated build env)."""
    tree = ast.parse((HERE / "src" / "moeinf" / module).read_text())
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
        self._build_policy_core(cc, Path(self.build_lib) / "moeinf" / "runtime")

    def _build_policy_core(self, cc: str, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(POLICY_CORE, dest / POLICY_CORE.name)
        consts = _build_constants("runtime/policy_core.py", ("FLAGS", "MODULE_NAME"))
        include = sysconfig.get_paths()["include"]
        if not (Path(include) / "Python.h").is_file():
            print("moeinf: no Python headers: the policy cores will be compiled on first use or skipped")
            return
        module = dest / (consts["MODULE_NAME"] + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        cmd = [cc, *consts["FLAGS"], f"-I{include}", "-o", str(module), str(POLICY_CORE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # not fatal: the run-time build or the Python policy takes over
            print(f"moeinf: building the policy cores failed:\n{proc.stderr}")


setup(cmdclass={"build_py": BuildWithKernels})
