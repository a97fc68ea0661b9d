"""The check command install.sh prints sees the secrets the service will get."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from edgetok.procs import to_toml

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd" / "install.sh"


def test_printed_check_reads_the_credentials_directory(tmp_path: Path,
                                                       tiny_bundle: Path) -> None:
    """An API bound beyond loopback with its token only in /etc/edgetok/credentials: the
    printed command passes the check, as the service would start; without the credentials
    directory the same check fails."""
    out = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path), "--units-only"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    line = next(x for x in out.splitlines() if "gateway --config" in x and "--check-config" in x)
    words = shlex.split(line)
    assert words[:3] == ["sudo", "env", "CREDENTIALS_DIRECTORY=/etc/edgetok/credentials"]
    etc = tmp_path / "etc/edgetok"
    config = tomllib.loads((etc / "gateway.toml").read_text())
    config.update(state_dir=str(tmp_path / "state"))
    config["bundle"]["path"] = str(tiny_bundle)
    config["decision"]["variant"] = "r0.00-s1"
    config["http"]["host"] = "0.0.0.0"
    (etc / "gateway.toml").write_text(to_toml(config))
    (etc / "credentials/api_token").write_text("s3cret-token\n")
    # The printed command rebased onto the staged root, run by this interpreter, not sudo.
    rebased = [w.replace("/etc/edgetok", str(etc)) for w in words[1:]]
    edgetok = next(i for i, w in enumerate(rebased) if w.endswith("/bin/edgetok"))
    rebased[edgetok:edgetok + 1] = [sys.executable, "-m", "edgetok"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGETOK_API_TOKEN", "CREDENTIALS_DIRECTORY")}
    ok = subprocess.run(rebased, capture_output=True, text=True, timeout=120, env=env,
                        cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bare = subprocess.run(rebased[2:], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert bare.returncode == 2 and "http.host" in bare.stderr
