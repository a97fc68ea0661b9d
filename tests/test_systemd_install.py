"""systemd/install.sh into a temporary root: a runtime-only venv, configs, units, uninstall."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd" / "install.sh"
UNITS = ["edgetok-gateway.service", "edgetok-server.service"]
DROPIN = "edgetok-gateway.service.d/actuators.conf"
UNIT_DIR = Path("etc/systemd/system")
VENV = Path("opt/edgetok/venv")
# pip builds the project and fetches the runtime wheels; allow for a slow mirror.
INSTALL_TIMEOUT_S = 900


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run install.sh with `args`; output is kept for failure messages."""
    proc = subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_names_every_option() -> None:
    """--help documents install, uninstall and the staging options."""
    out = run("--help").stdout
    for option in (
        "--prefix",
        "--root",
        "--with-actuators",
        "--uninstall",
        "--purge",
        "--units-only",
        "--python",
    ):
        assert option in out


def test_rejects_unknown_options_and_stray_purge(tmp_path: Path) -> None:
    """A typo must not start a partial install."""
    bad = run("--root", str(tmp_path), "--with-actuator", check=False)
    assert bad.returncode != 0 and "unknown option" in bad.stderr
    stray = run("--root", str(tmp_path), "--purge", check=False)
    assert stray.returncode != 0
    assert not any(tmp_path.iterdir())


def test_units_only_into_a_root(tmp_path: Path) -> None:
    """Configs, units and credentials dir land under --root; the example paths are rebased."""
    out = run("--root", str(tmp_path), "--units-only").stdout
    for unit in UNITS:
        assert (tmp_path / UNIT_DIR / unit).read_text() == (ROOT / "systemd" / unit).read_text()
    assert not (tmp_path / UNIT_DIR / DROPIN).exists()
    creds = tmp_path / "etc/edgetok/credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    gateway = tomllib.loads((tmp_path / "etc/edgetok/gateway.toml").read_text())
    server = tomllib.loads((tmp_path / "etc/edgetok/server.toml").read_text())
    # Installed configs must point into the state directory, the only writable place under
    # ProtectSystem=strict, not at paths relative to /etc/edgetok.
    assert gateway["state_dir"].startswith("/var/lib/edgetok/")
    assert gateway["bundle"]["path"].startswith("/var/lib/edgetok/bundles/")
    assert all(b.startswith("/var/lib/edgetok/bundles/") for b in server["bundles"])
    assert (tmp_path / "var/lib/edgetok/bundles").is_dir()
    assert "systemctl enable --now edgetok-gateway.service" in out


def test_prefix_rewrites_execstart(tmp_path: Path) -> None:
    """Another --prefix is reflected in ExecStart=, so the unit runs the venv it installed."""
    run("--root", str(tmp_path), "--units-only", "--prefix", "/srv/etk")
    text = (tmp_path / UNIT_DIR / UNITS[0]).read_text()
    assert "ExecStart=/srv/etk/venv/bin/edgetok gateway --config" in text
    assert "/opt/edgetok/" not in text


def test_reinstall_keeps_configs_and_withdraws_actuators(tmp_path: Path) -> None:
    """A second run never overwrites an edited config; without the flag the drop-in goes."""
    run("--root", str(tmp_path), "--units-only", "--with-actuators")
    assert (tmp_path / UNIT_DIR / DROPIN).read_text() == (ROOT / "systemd" / DROPIN).read_text()
    config = tmp_path / "etc/edgetok/gateway.toml"
    config.write_text("# edited by the operator\n")
    out = run("--root", str(tmp_path), "--units-only").stdout
    assert config.read_text() == "# edited by the operator\n"
    assert "kept the existing" in out
    assert not (tmp_path / UNIT_DIR / DROPIN).exists()
    assert not (tmp_path / UNIT_DIR / DROPIN).parent.exists()


def test_uninstall_and_purge(tmp_path: Path) -> None:
    """--uninstall removes units, drop-in and venv but keeps config; --purge removes it too."""
    run("--root", str(tmp_path), "--units-only", "--with-actuators")
    (tmp_path / VENV / "bin").mkdir(parents=True)
    state = tmp_path / "var/lib/edgetok/gateway"
    state.mkdir(parents=True)
    run("--root", str(tmp_path), "--uninstall")
    assert not any((tmp_path / UNIT_DIR).iterdir())
    assert not (tmp_path / "opt/edgetok").exists()
    assert (tmp_path / "etc/edgetok/gateway.toml").exists() and state.is_dir()
    run("--root", str(tmp_path), "--uninstall", "--purge")
    assert not (tmp_path / "etc/edgetok").exists()
    assert not (tmp_path / "var/lib/edgetok").exists()


@pytest.mark.slow
def test_full_install_has_runtime_without_torch(tmp_path: Path) -> None:
    """The real thing: pip installs edgetok's runtime into the venv, and torch stays out."""
    python = os.path.join(sys.base_prefix, "bin", "python3")
    run("--root", str(tmp_path), "--python", python)
    venv_python = tmp_path / VENV / "bin" / "python"
    probe = (
        "import importlib.util as u, onnxruntime, numpy, aiomqtt, aiohttp\n"
        "import edgetok.gateway.daemon, edgetok.agent.server, edgetok.sdnotify\n"
        "assert u.find_spec('torch') is None, 'torch in the runtime venv'\n"
        "import edgetok, pathlib; print(pathlib.Path(edgetok.__file__).resolve())\n"
    )
    # Run from the temporary root so the checkout's folders cannot shadow the installed package.
    proc = subprocess.run(
        [str(venv_python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(tmp_path / VENV)
    # The entry point the units start exists and runs.
    cli = subprocess.run(
        [str(tmp_path / VENV / "bin" / "edgetok"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "gateway" in cli.stdout
    # And systemd accepts the installed units with that real executable in ExecStart=.
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        staged = tmp_path / "verify"
        staged.mkdir()
        for unit in UNITS:
            text = (tmp_path / UNIT_DIR / unit).read_text()
            (staged / unit).write_text(text.replace("/opt/edgetok/", f"{tmp_path}/opt/edgetok/"))
        proc = subprocess.run(
            [
                analyze,
                "verify",
                "--recursive-errors=no",
                "--man=no",
                *(str(staged / u) for u in UNITS),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            proc.stdout + proc.stderr
        )
    run("--root", str(tmp_path), "--uninstall")
    assert not (tmp_path / VENV).exists()
