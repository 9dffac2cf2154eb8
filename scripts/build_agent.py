#!/usr/bin/env python3
"""Build the agent so that a host needs nothing installed (docs/agent-builds.md).

    python scripts/build_agent.py [--out dist] [--only pyz|onefile] [--version V]

- ``DIR/zy-agent.pyz``: a zipapp of the agent's pure-Python code and dependencies, copied from the
  running interpreter's packages (no network, a second or two). Runs on any stdlib Python 3.11+:
  ``python3 zy-agent.pyz --join-file PATH --state-dir D``. Enrollment uses the pure-Python X25519 in
  ``hcsdk/protocol/x25519.py`` there, since the compiled ``cryptography`` cannot load from a zip.
- ``DIR/zy-agent``: a PyInstaller one-file executable bundling the interpreter (and ``orjson``,
  but not ``cryptography``: it enrolls as the zipapp does); needs only a glibc at least as new as
  the build host's.

Both take ``zy agent``'s options, and ``--zy-worker`` (the plugin worker the agent starts).
``--version V`` stamps V into the built copy of ``hcsdk/common/version.py`` only (self-update tests
need an agent whose version differs from the running one's). Run it with the interpreter whose
packages are to be shipped (``make agent`` uses .venv/bin/python).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: what the agent imports at run time: packages (directories) and single-module distributions.
#: Everything here is pure Python (checked when copying).
PACKAGES = ["agent", "hcsdk", "anyio", "idna", "h2", "hpack", "hyperframe", "httpx", "httpcore", "h11", "certifi"]
#: shipped when installed: anyio uses sniffio if present; typing_extensions serves anyio.itertools below 3.15
OPTIONAL = ["sniffio", "typing_extensions"]

#: never bundled into the one-file build: what only the SDK, the services, the notebooks or the
#: httpx command line use (imports the agent never reaches at run time). `cryptography` (~5 MiB of
#: the executable) served only the one X25519 exchange at enrollment, which hcsdk/protocol/x25519.py does.
EXCLUDES = [
    "cryptography", "_cffi_backend", "cffi", "_pytest", "packaging",
    "master", "proxy", "kernel_ext", "hcsdk.localfleet", "hcsdk.cli", "hcsdk.net.serve",
    "pandas", "numpy", "pyarrow", "IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core",
    "jupyterlab", "notebook", "nbformat", "nbclient", "nbconvert", "papermill", "matplotlib", "traitlets",
    "fastapi", "starlette", "pydantic", "pydantic_core", "granian", "psutil", "asyncssh", "uvloop",
    "rich", "pygments", "click", "httpx._main", "brotli", "brotlicffi", "zstandard", "socksio", "trio",
    "tkinter", "_tkinter", "pytest", "hypothesis", "playwright", "setuptools", "pip", "PyInstaller",
]

#: the entry point of both builds. httpx/__init__ imports its command-line client (click, rich,
#: pygments) when those are installed; a None entry makes that an ImportError httpx handles.
ENTRY = '''\
"""zy-agent: `zy agent` on its own (scripts/build_agent.py)."""
import sys

if sys.version_info < (3, 11):
    sys.exit("zy-agent.pyz needs Python 3.11 or newer (this is %s); use the one-file zy-agent" % sys.version.split()[0])
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

# The one-file build on Linux: the bootloader unpacks the bundle, points LD_LIBRARY_PATH at it
# (the loader reads that once, at start) and marks the environment (_PYI_*) so that this program,
# started again from here (the plugin worker, the restart after enrollment), reuses the unpacked
# files. Commands the agent runs inherit the environment, and with that LD_LIBRARY_PATH the host's
# programs would load the bundle's libssl, libz, libffi..., so it goes back to the host's value;
# a process of this program that finds it so (started by this one) starts itself once more with
# the bundle's path first.
_BUNDLE = getattr(sys, "_MEIPASS", None) if getattr(sys, "frozen", False) else None
if _BUNDLE and sys.platform.startswith("linux"):
    import os

    _path = os.environ.get("LD_LIBRARY_PATH", "")
    if _path.split(os.pathsep)[0] != _BUNDLE:
        _env = dict(os.environ, LD_LIBRARY_PATH=_BUNDLE + (os.pathsep + _path if _path else ""))
        if _path:
            _env["LD_LIBRARY_PATH_ORIG"] = _path
        os.execve(sys.executable, [sys.executable, *sys.argv[1:]], _env)
    _orig = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if _orig is None:
        del os.environ["LD_LIBRARY_PATH"]
    else:
        os.environ["LD_LIBRARY_PATH"] = _orig

from agent.__main__ import main  # noqa: E402

sys.exit(main())
'''


class BuildError(Exception):
    pass


def _source(name: str) -> Path:
    """Where ``name`` comes from: this checkout for the project's own packages (so a build never
    ships an older installed copy, and needs no install of the project), else where the running
    interpreter imports it from (a package directory or a module file)."""
    if (ROOT / name / "__init__.py").is_file():
        return ROOT / name
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise BuildError(f"{name} is not importable by {sys.executable}; run this with the project's "
                         "virtualenv (.venv/bin/python scripts/build_agent.py, or `make agent`)")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin)
    raise BuildError(f"{name} is not a pure-Python package ({spec.origin}); it cannot go into the zipapp")


def stage(dest: Path, version: str | None = None) -> Path:
    """Copy the agent's packages into ``dest`` (a directory that becomes the zipapp's root and the
    one-file build's import path), stamp ``version``, and write ``__main__.py``."""
    dest.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", "*.dist-info")
    for name in PACKAGES + OPTIONAL:
        if name in OPTIONAL and importlib.util.find_spec(name) is None:
            continue
        src = _source(name)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
            compiled = [p for p in (dest / name).rglob("*") if p.suffix in (".so", ".pyd", ".dylib", ".dll")]
            if compiled:
                raise BuildError(f"{name} contains compiled code ({compiled[0].name}); a zipapp cannot load it")
        else:
            shutil.copy2(src, dest / src.name)
    if version:
        if not re.fullmatch(r"[0-9A-Za-z.+!_-]+", version):
            raise BuildError(f"--version {version!r}: use letters, digits and . + ! _ - only")
        (dest / "hcsdk" / "common" / "version.py").write_text(f'__version__ = "{version}"\n')
    (dest / "__main__.py").write_text(ENTRY)
    return dest


def build_pyz(out: Path, version: str | None = None, pyc: bool = True) -> Path:
    target = out / "zy-agent.pyz"
    with tempfile.TemporaryDirectory(prefix="zy-agent-pyz-") as tmp:
        root = stage(Path(tmp) / "root", version)
        if pyc:
            compile_beside(root, target.name)
        # zipapp.create_archive walks the tree sorted; fixed timestamps make the archive reproducible
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315964800"))  # 1980-01-06, the zip format's floor
        for path in [root, *root.rglob("*")]:
            os.utime(path, (epoch, epoch))
        tmp_target = out / "zy-agent.pyz.tmp"
        zipapp.create_archive(root, tmp_target, interpreter="/usr/bin/env python3", compressed=True)
        tmp_target.chmod(0o755)  # create_archive makes it executable for its owner only
        tmp_target.replace(target)
    return target


def compile_beside(root: Path, archive: str) -> None:
    """Put ``module.pyc`` beside each ``module.py``, where zipimport looks for it: a Python of the
    building one's minor version then starts the agent in about 0.3 s and 31 MiB instead of
    0.7 s and 44 MiB (it cannot write a cache of its own into the archive). Any other version sees
    the wrong magic number and compiles the source, as it would without them. Unchecked hashes:
    the archive cannot change under them, and timestamps would tie the bytes to the build's clock."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        py_compile.compile(str(path), cfile=str(path) + "c", dfile=f"{archive}/{rel}", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def build_onefile(out: Path, version: str | None = None, work: Path | None = None) -> tuple[Path, str]:
    if importlib.util.find_spec("PyInstaller") is None:
        raise BuildError(f"PyInstaller is not installed for {sys.executable}: "
                         f"{sys.executable} -m pip install 'pyinstaller>=6.10' (the project's test extra has it: "
                         "pip install -e '.[test]'); or build only the zipapp with --only pyz")
    if sys.platform.startswith("linux") and shutil.which("objdump") is None:
        raise BuildError("PyInstaller needs objdump on Linux: apt-get install binutils")
    target = out / ("zy-agent.exe" if os.name == "nt" else "zy-agent")
    with tempfile.TemporaryDirectory(prefix="zy-agent-onefile-") as tmp:
        base = work or Path(tmp)
        src = stage(base / "src", version)
        entry = base / "zy_agent.py"
        entry.write_text(ENTRY)
        argv = [
            sys.executable, "-m", "PyInstaller", "--onefile", "--name", "zy-agent", "--noconfirm", "--clean",
            "--log-level", "WARN", "--distpath", str(base / "dist"), "--workpath", str(base / "build"),
            "--specpath", str(base), "--paths", str(src),
            # symbol tables are half of the executable (pyenv's libpython alone carries 12 MiB); not on
            # Windows, where PyInstaller advises against it
            *(["--strip"] if os.name != "nt" else []),
            # plugins are imported by name in the worker process, so the analysis cannot see them
            "--collect-submodules", "agent",
            "--collect-data", "certifi",
            *[arg for mod in EXCLUDES for arg in ("--exclude-module", mod)],
            str(entry),
        ]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        result = subprocess.run(argv, cwd=base, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            tail = result.stdout[-4000:] + result.stderr[-4000:]
            raise BuildError(f"PyInstaller failed ({result.returncode}):\n{tail}")
        built = base / "dist" / target.name
        floor = glibc_floor(base / "build" / "zy-agent" / "PKG-00.toc")
        shutil.copy2(built, out / (target.name + ".tmp"))
        (out / (target.name + ".tmp")).replace(target)
    return target, floor


def glibc_floor(toc: Path) -> str:
    """The oldest glibc the one-file build runs on: the highest GLIBC_x.y symbol version that any
    bundled binary (the bootloader, libpython, extension modules, libssl ...) asks for."""
    if not sys.platform.startswith("linux") or not toc.exists():
        return ""
    paths = re.findall(r"\('[^']*',\s*'([^']*)',\s*'(?:BINARY|EXTENSION)'\)", toc.read_text())
    versions = set()
    for path in paths:
        dump = subprocess.run(["objdump", "-T", path], capture_output=True, text=True).stdout
        versions.update(re.findall(r"GLIBC_([0-9]+(?:\.[0-9]+)+)", dump))
    if not versions:
        return ""
    return max(versions, key=lambda v: tuple(int(n) for n in v.split(".")))


def describe(path: Path, seconds: float) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path}  {path.stat().st_size / 2**20:.1f} MiB  sha256 {digest}  ({seconds:.1f}s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the zero-dependency agent: zy-agent (PyInstaller one-file) "
                                     "and zy-agent.pyz (zipapp for a stdlib Python 3.11+).")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (default dist/)")
    parser.add_argument("--only", choices=["pyz", "onefile"], help="build just one form")
    parser.add_argument("--version", help="stamp this version into the built copy of hcsdk/common/version.py")
    parser.add_argument("--no-pyc", action="store_true",
                        help="leave compiled bytecode out of the zipapp (smaller; slower start on every Python)")
    parser.add_argument("--work", type=Path, help="keep PyInstaller's work files here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if sys.version_info < (3, 11):  # noqa: UP036  (someone's system python3 may be older)
        print("build_agent: needs Python 3.11+", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "pyz"):
            start = time.monotonic()
            path = build_pyz(args.out, args.version, pyc=not args.no_pyc)
            print(describe(path, time.monotonic() - start), flush=True)
        if args.only in (None, "onefile"):
            start = time.monotonic()
            if args.work:
                args.work.mkdir(parents=True, exist_ok=True)
            path, floor = build_onefile(args.out, args.version, args.work)
            print(describe(path, time.monotonic() - start), flush=True)
            if floor:
                print(f"{path}: needs glibc >= {floor} (built against {platform.libc_ver()[1] or '?'}); "
                      "see docs/agent-builds.md for older systems", flush=True)
    except BuildError as exc:
        print(f"build_agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
