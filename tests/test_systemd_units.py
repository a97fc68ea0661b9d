"""The unit files: systemd-analyze verify and security, and what the units promise the code."""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = ROOT / "systemd"
UNITS = ["edgetok-gateway.service", "edgetok-server.service"]
DROPIN = "edgetok-gateway.service.d/actuators.conf"
INSTALLED_PREFIX = "/opt/edgetok/venv/bin/"
# The bar: `systemd-analyze security --threshold=25`, i.e. exposure <= 2.5 of 10.
EXPOSURE_LIMIT = 2.5
# Anything systemd-analyze says about a unit that means a line was not understood or a
# referenced file is missing. By default these are warnings with exit status 0.
PROBLEM = re.compile(
    r"Unknown (key|lvalue|section)|ignoring|Invalid|Failed|not executable|"
    r"Missing|No such file|[Dd]eprecated|obsolete",
    re.IGNORECASE,
)

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys stay separate."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(unit: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    """Every value assigned to `key` in `section`."""
    return [v for s, k, v in unit if s == section and k == key]


def staged(tmp_path: Path, *, dropin: bool, edit: str = "") -> Path:
    """Copies of the units whose ExecStart= names a real executable (this checkout's).

    `edit` is appended to the [Service] section of each copy.
    """
    exe = shutil.which("edgetok") or str(ROOT / ".venv" / "bin" / "edgetok")
    if not Path(exe).is_file():
        pytest.skip("the edgetok entry point is not installed in this environment")
    dest = tmp_path / "units"
    dest.mkdir(parents=True)
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text().replace(INSTALLED_PREFIX + "edgetok", exe)
        (dest / name).write_text(text.replace("\n[Install]", f"\n{edit}[Install]"))
    if dropin:
        (dest / DROPIN).parent.mkdir()
        shutil.copy(SYSTEMD_DIR / DROPIN, dest / DROPIN)
    return dest


def verify(unit_dir: Path) -> tuple[int, str]:
    """systemd-analyze verify on both units; exit status and everything it printed."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [
            ANALYZE,
            "verify",
            "--recursive-errors=no",
            "--man=no",
            *(str(unit_dir / u) for u in UNITS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def security(path: Path) -> tuple[int, float, str]:
    """Offline systemd-analyze security at the issue's threshold: status, exposure, table."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=25", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return proc.returncode, float(match.group(1)), proc.stdout


@needs_analyze
@pytest.mark.parametrize("dropin", [False, True], ids=["units", "units+actuators"])
def test_verify_is_clean(tmp_path: Path, dropin: bool) -> None:
    """verify passes and reports nothing at all, with or without the actuators drop-in."""
    rc, out = verify(staged(tmp_path, dropin=dropin))
    assert rc == 0, out
    assert not PROBLEM.search(out), out


@needs_analyze
def test_verify_check_catches_a_misspelled_key(tmp_path: Path) -> None:
    """The check above would notice a typo: systemd only warns about unknown keys."""
    rc, out = verify(staged(tmp_path, dropin=False, edit="ProtectSytem=strict\n"))
    assert rc != 0 or PROBLEM.search(out)
    assert "ProtectSytem" in out


@needs_analyze
def test_verify_fails_without_the_executable(tmp_path: Path) -> None:
    """ExecStart= is checked for real: a missing executable is an error."""
    dest = staged(tmp_path, dropin=False)
    unit = dest / UNITS[0]
    unit.write_text(
        re.sub(
            r"^ExecStart=\S+",
            f"ExecStart={tmp_path}/missing/edgetok",
            unit.read_text(),
            flags=re.MULTILINE,
        )
    )
    rc, out = verify(dest)
    assert rc != 0
    assert "missing/edgetok" in out


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_within_limit(tmp_path: Path, name: str) -> None:
    """Both units pass `security --offline=yes --threshold=25` (exposure <= 2.5)."""
    rc, exposure, table = security(staged(tmp_path, dropin=False) / name)
    assert rc == 0, table
    assert exposure <= EXPOSURE_LIMIT, table


def _row(table: str, setting: str) -> str:
    """The mark (✓ or ✗) that security printed for one setting."""
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == setting:
            return parts[0]
    raise AssertionError(f"{setting} not in:\n{table}")


@needs_analyze
def test_actuators_dropin_adds_only_its_rights(tmp_path: Path) -> None:
    """The drop-in merges into the sandbox: CAP_NET_ADMIN and netlink, nothing broader."""
    _, base, base_table = security(staged(tmp_path / "a", dropin=False) / UNITS[0])
    rc, combined, table = security(staged(tmp_path / "b", dropin=True) / UNITS[0])
    assert rc == 0, table
    assert combined > base
    for granted in (
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "RestrictAddressFamilies=~AF_NETLINK",
        "AmbientCapabilities=",
        "Delegate=",
    ):
        assert _row(base_table, granted) == "✓" and _row(table, granted) == "✗", granted
    # Rights the actuators do not need stay withheld after the merge.
    kept_rows = (
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
        "RestrictAddressFamilies=~AF_PACKET",
        "NoNewPrivileges=",
        "ProtectSystem=",
        "MemoryDenyWriteExecute=",
        "SystemCallFilter=~@privileged",
    )
    for kept in kept_rows:
        assert _row(table, kept) == "✓", kept


@pytest.mark.parametrize(("name", "role"), [(UNITS[0], "gateway"), (UNITS[1], "server")])
def test_unit_contract(name: str, role: str) -> None:
    """Readiness, restart, paths and secrets are what the daemons and install.sh rely on."""
    unit = parse_unit((SYSTEMD_DIR / name).read_text())
    svc = "Service"
    assert values(unit, svc, "Type") == ["notify"]
    assert values(unit, svc, "NotifyAccess") == ["main"]
    assert int(values(unit, svc, "WatchdogSec")[0]) > 0
    assert values(unit, svc, "Restart") == ["on-failure"]
    assert values(unit, svc, "ExecStart") == [
        f"{INSTALLED_PREFIX}edgetok {role} --config /etc/edgetok/{role}.toml"
    ]
    assert "network-online.target" in values(unit, "Unit", "Wants")
    assert "network-online.target" in " ".join(values(unit, "Unit", "After"))
    assert values(unit, svc, "StateDirectory") == ["edgetok"]
    # Every credential is loaded from /etc/edgetok/credentials and has a fallback, because a
    # missing LoadCredential= file fails the start (status 243/CREDENTIALS).
    loaded = dict(v.split(":", 1) for v in values(unit, svc, "LoadCredential"))
    assert loaded == {c: f"/etc/edgetok/credentials/{c}" for c in ("mqtt_password", "api_token")}
    assert {v.split(":", 1)[0] for v in values(unit, svc, "SetCredential")} == set(loaded)
    assert values(unit, svc, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert values(unit, svc, "CapabilityBoundingSet") == [""]


def test_gateway_wants_but_does_not_require_the_local_broker() -> None:
    """A gateway with a remote broker, or without mosquitto installed, must still start."""
    unit = parse_unit((SYSTEMD_DIR / UNITS[0]).read_text())
    assert "mosquitto.service" in values(unit, "Unit", "Wants")
    assert "mosquitto.service" in values(unit, "Unit", "After")
    assert not [
        v
        for v in values(unit, "Unit", "Requires") + values(unit, "Unit", "BindsTo")
        if "mosquitto" in v
    ]


def test_units_deliver_every_secret_the_code_reads() -> None:
    """Each read_secret("<name>", ...) in the daemons has a matching LoadCredential=."""
    pattern = re.compile(r"read_secret\(\s*\"(\w+)\"")
    for name, package in ((UNITS[0], "gateway"), (UNITS[1], "agent")):
        wanted = {m for f in (ROOT / package).rglob("*.py") for m in pattern.findall(f.read_text())}
        unit = parse_unit((SYSTEMD_DIR / name).read_text())
        loaded = {v.split(":", 1)[0] for v in values(unit, "Service", "LoadCredential")}
        assert wanted, f"no read_secret() calls found under {package}/"
        assert wanted <= loaded, (name, wanted - loaded)


def _unit_command(text: str, key: str) -> list[str]:
    """The argv of `key` (continuation lines joined, prefixes stripped, $$ unescaped)."""
    joined = re.sub(r"\\\n", " ", text)
    line = next(v for _, k, v in parse_unit(joined) if k == key)
    return [a.replace("$$", "$") for a in shlex.split(line.lstrip("-+@:!"))]


@pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to another group needs root")
def test_cpufreq_grant_touches_only_the_knobs(tmp_path: Path) -> None:
    """The drop-in's ExecStartPre= gives the group write access to exactly the listed knobs."""
    argv = _unit_command((SYSTEMD_DIR / DROPIN).read_text(), "ExecStartPre")
    group = grp.getgrgid(1).gr_name  # any group other than root's stands in for 'edgetok'
    fake = tmp_path / "cpufreq"
    knobs = ("scaling_governor", "scaling_setspeed", "scaling_min_freq", "scaling_max_freq")
    (fake / "policy0").mkdir(parents=True)
    (fake / "policy1").mkdir()
    for name in (*knobs, "scaling_cur_freq"):
        (fake / "policy0" / name).write_text("0\n")
        (fake / "policy0" / name).chmod(0o644)
    (fake / "policy1" / "scaling_max_freq").write_text("0\n")  # a policy with fewer knobs
    script = argv[-1].replace("/sys/devices/system/cpu/cpufreq", str(fake))
    script = script.replace("chgrp edgetok", f"chgrp {group}")
    proc = subprocess.run([*argv[:-1], script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for name in knobs:
        st = (fake / "policy0" / name).stat()
        assert st.st_gid == 1 and st.st_mode & stat.S_IWGRP, name
    assert (fake / "policy1" / "scaling_max_freq").stat().st_gid == 1
    untouched = (fake / "policy0" / "scaling_cur_freq").stat()
    assert untouched.st_gid == 0 and not untouched.st_mode & stat.S_IWGRP
