"""The zero-dependency agent builds (scripts/build_agent.py, docs/agent-builds.md): the zipapp on a
bare stdlib Python and the PyInstaller one-file executable with an empty environment each enroll
with a real master and run a command; the zipapp carries nothing the agent does not need; and
the pure-Python X25519 that enrolls without `cryptography` agrees with it and with RFC 7748."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet, Proc
from hcsdk.protocol import e2e as _e2e
from hcsdk.protocol import x25519 as _x25519

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build_agent.py"
VERSION = "0.0.0+buildtest"
#: the Python a bare host would have: the interpreter the virtualenv was made from, run with -I -S
#: so that neither the virtualenv's nor that interpreter's own site-packages are visible
BARE_PYTHON = [getattr(sys, "_base_executable", sys.executable), "-I", "-S"]
#: modules a plain agent must never load
HEAVY = {"pandas", "numpy", "IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core", "traitlets",
         "fastapi", "starlette", "pydantic", "granian", "rich", "pygments", "click", "master", "proxy", "kernel_ext"}


def _build(out: Path, form: str) -> Path:
    result = subprocess.run([sys.executable, str(BUILD), "--out", str(out), "--only", form, "--version", VERSION],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    built = out / ("zy-agent.pyz" if form == "pyz" else "zy-agent")
    assert built.is_file() and str(built) in result.stdout and "sha256" in result.stdout
    return built


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("agent-pyz"), "pyz")


@pytest.fixture(scope="module")
def onefile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("agent-onefile"), "onefile")


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("builds-fleet"), ["--offline-grace", "2", "--heartbeat", "2"])
    fleet.start_master()
    try:
        yield fleet
    finally:
        fleet.close()


def _enroll_and_run(fleet: Fleet, name: str, command: list[str], home: Path, ld_library_path: str = "") -> None:
    """Start ``command`` as an agent with an empty environment (a PATH and a fresh HOME only, as
    `env -i` would leave), have it enroll, run a command through the SDK, and check the facts."""
    home.mkdir(parents=True)
    argv = [*command, "--join", fleet.token, "--state-dir", str(home / "state"), "--hostname", name,
            "--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2", "--h2-retry", "2"]
    proc = Proc(name, argv, fleet.root / f"agent-{name}.log", {"PATH": "/usr/bin:/bin", "HOME": str(home)})
    fleet.agents[name] = proc
    fleet.wait_online(name, timeout=60)
    out = proc.output()
    assert "enrolled as" in out, out
    # the first start re-executes itself once enrolled (agent/cli.py _restart): the same process,
    # now connecting as the enrolled agent
    assert proc.alive and out.count("connecting to") >= 1, out

    script = "echo hello from $ZY_HOSTNAME; echo HOME=$HOME; env | wc -l; echo LD=$LD_LIBRARY_PATH"
    df = fleet.client.run(script, targets=name, timeout=30).to_dataframe()
    row = df.iloc[0]
    assert row["status"] == "ok", df.to_dict("records")
    lines = row["stdout"].splitlines()
    assert lines[0] == f"hello from {name}" and lines[1] == f"HOME={home}", lines
    assert int(lines[2]) < 15, "the agent should pass on its own (empty) environment"
    # the host's library path, not the one-file bootloader's: a command must not load the bundle's libraries
    assert lines[3] == f"LD={ld_library_path}", lines
    inv = fleet.client.inventory(name)
    assert inv.iloc[0]["agent_version"] == VERSION  # the stamped build, not the running SDK's
    # a plugin command: the agent starts its plugin worker from the same build (`--zy-worker`),
    # which imports the plugin module by name
    hostname = Path("/etc/hostname")
    if hostname.is_file():
        df = fleet.client.run(cmd="file.read", args={"path": str(hostname)}, targets=name, timeout=30).to_dataframe()
        assert df.iloc[0]["status"] == "ok", df.to_dict("records")
        assert df.iloc[0]["stdout"] == hostname.read_text()


def test_zipapp_on_a_bare_python_enrolls_and_runs(master: Fleet, pyz: Path, tmp_path: Path) -> None:
    _enroll_and_run(master, "pyz-1", [*BARE_PYTHON, str(pyz)], tmp_path / "home")


def test_zipapp_holds_only_what_the_agent_needs(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        top = {name.split("/")[0].removesuffix(".pyc").removesuffix(".py") for name in zf.namelist()}
        version = zf.read("hcsdk/common/version.py").decode()
        names = set(zf.namelist())
        assert not [n for n in names if n.endswith((".so", ".pyd", ".dll", ".dylib"))]
        # bytecode beside every module, for a Python of the building one's version
        assert {n + "c" for n in names if n.endswith(".py")} <= names
    assert top <= {"__main__", "agent", "hcsdk", "anyio", "sniffio", "idna", "h2", "hpack", "hyperframe", "httpx",
                   "httpcore", "h11", "certifi", "typing_extensions"}, top
    assert VERSION in version
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    # everything an agent imports, on a bare Python: from the archive or the standard library, and
    # nothing heavy (the check in tests/test_structure.py, for the built form)
    result = subprocess.run([*BARE_PYTHON, "-c", _IMPORT_CHECK, str(pyz), VERSION], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == VERSION
    assert not set(report["loaded"]) & (HEAVY | {"cryptography", "orjson"}), report["loaded"]
    assert report["outside"] == [], "loaded from outside the archive and the standard library"
    assert report["findable"] == [], "importable on a bare Python with the archive on the path"


_IMPORT_CHECK = """
import importlib.util, json, sys, sysconfig
archive, version = sys.argv[1:3]
sys.path.insert(0, archive)
sys.modules.setdefault("httpx._main", None)
import agent.__main__, agent.cli, agent.core, agent.executor, agent.worker_child
import hcsdk.net.channel, hcsdk.net.enroll, hcsdk.protocol.e2e, hcsdk.common.facts, hcsdk.common.version
stdlib = sysconfig.get_paths()["stdlib"]
print(json.dumps({
    "version": hcsdk.common.version.__version__,
    "loaded": sorted({name.split(".")[0] for name in sys.modules}),
    "outside": sorted(name for name, mod in list(sys.modules.items())
                      if getattr(mod, "__file__", None) and not mod.__file__.startswith((archive, stdlib))),
    "findable": [name for name in ("pandas", "cryptography", "IPython", "fastapi", "rich")
                 if importlib.util.find_spec(name) is not None],
}))
"""


@pytest.mark.timeout(600)
def test_onefile_with_an_empty_environment_enrolls_and_runs(master: Fleet, onefile: Path, tmp_path: Path) -> None:
    assert os.access(onefile, os.X_OK)
    home = tmp_path / "home"
    host_libs = "/opt/zy-test/lib"  # the host's own LD_LIBRARY_PATH: commands get it back unchanged
    _enroll_and_run(master, "onefile-1", ["env", "-i", f"HOME={home}", f"LD_LIBRARY_PATH={host_libs}", str(onefile)],
                    home, ld_library_path=host_libs)
    # the restart after enrollment and the plugin worker run from the one unpacked bundle, with
    # its libraries: the bootloader's one child is the agent, whose child is the worker, both
    # Python itself (not a second bootloader unpacking a copy of its own)
    bootloader = master.agents["onefile-1"].popen.pid

    def children(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()

    def libs(pid: int | str) -> set[str]:
        return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if "/_MEI" in line and ".so" in line}

    (agent,) = children(bootloader)
    (worker,) = children(int(agent))
    bundle = {lib for lib in libs(agent) if "libpython" in lib}
    assert bundle and bundle <= libs(worker), (libs(agent), libs(worker))


def test_onefile_bundles_no_heavy_packages(onefile: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "PyInstaller.utils.cliutils.archive_viewer", "--list",
                             "--recursive", "--brief", str(onefile)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = {line.strip().split(".")[0].split("/")[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"agent", "hcsdk", "anyio", "httpx", "h2"} <= names, sorted(names)
    assert not names & HEAVY, names & HEAVY


# -- X25519 without cryptography ---------------------------------------------------------------------------

RFC7748 = [  # section 5.2: scalar, u-coordinate, result
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]


@pytest.mark.parametrize(("scalar", "u", "out"), RFC7748)
def test_x25519_rfc7748_vectors(scalar: str, u: str, out: str) -> None:
    assert _x25519.x25519(bytes.fromhex(scalar), bytes.fromhex(u)).hex() == out


def test_x25519_rfc7748_iterated_and_diffie_hellman() -> None:
    k = u = (9).to_bytes(32, "little")
    for i in range(1000):
        k, u = _x25519.x25519(k, u), k
        if i == 0:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
    # section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert _x25519.public_key(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert _x25519.public_key(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert _x25519.derive_shared(alice, _x25519.public_key(bob)).hex() == shared
    assert _x25519.derive_shared(bob, _x25519.public_key(alice)).hex() == shared
    with pytest.raises(ValueError):  # a small-order point gives the all-zero secret
        _x25519.derive_shared(alice, bytes(32))


def test_hkdf_rfc5869_vectors() -> None:
    okm = _x25519.hkdf_sha256(b"\x0b" * 22, 42, bytes(range(0xF0, 0xFA)), salt=bytes(range(13)))
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    assert _x25519.hkdf_sha256(b"\x0b" * 22, 42, b"").hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_pure_python_enrollment_keys_match_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent enrolled with the fallback derives the same MAC key as a master using cryptography."""
    master_private, master_public = _e2e.new_keypair()  # cryptography
    assert _x25519.public_key(master_private) == master_public
    for _ in range(5):
        monkeypatch.setattr(_e2e, "_crypto", lambda: False)
        agent_private, agent_public = _e2e.new_keypair()
        assert _e2e.public_key(agent_private) == agent_public
        agent_key = _e2e.derive_key(agent_private, master_public, "u-42")
        monkeypatch.undo()
        assert _e2e.public_key(agent_private) == agent_public  # cryptography's public key: the same
        assert _e2e.derive_key(master_private, agent_public, "u-42") == agent_key
        assert _e2e.derive_key(agent_private, master_public, "u-42") == agent_key
