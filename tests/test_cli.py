"""The ``proxyd`` command in-process: --check-config, unreadable files, hash-password."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxyd import __version__
from proxyd.cli import main
from proxyd.config import parse_config_text
from proxyd.http.access import verify_password

REPO = Path(__file__).resolve().parent.parent

BAD_CONFIG = """\
listen:
  - "127.0.0.1:3128"
  - nope
upstream:
  timeouts:
    conect: 5
log_level: loud
"""
BAD_ERRORS = [
    "bad.yaml:3: listen[1]: 'nope' is not HOST:PORT (write IPv6 as [::1]:3128)",
    "bad.yaml:6: upstream.timeouts.conect: unknown key",
    "bad.yaml:7: log_level: must be one of 'debug', 'info', 'warning', 'error' or 'critical', "
    "not 'loud'",
]


@pytest.mark.parametrize("name", ["proxyd.yaml", "proxyd.example.yaml"])
def test_check_config_accepts_the_shipped_files(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-config on a valid file exits 0 and says OK."""
    path = REPO / "config" / name
    assert main(["--check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: OK\n"
    assert err == ""


def test_check_config_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check-config on a bad file exits 1 and prints every error with file:line."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, "utf-8")
    assert main(["--check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[:-1] == BAD_ERRORS
    assert lines[-1] == f"proxyd: 3 error(s) in {path}"


def test_check_config_reports_invalid_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML syntax error is reported with its line, exit 1."""
    path = tmp_path / "broken.yaml"
    path.write_text("listen:\n  - a\n bad: x\n", "utf-8")
    assert main(["--check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("broken.yaml:3: invalid YAML: ")


@pytest.mark.parametrize("flag", ["--check-config", "--config"])
def test_unreadable_path_exits_1_with_a_clear_message(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file or a directory exits 1 naming the path and the reason, no traceback."""
    for path, reason in (
        (tmp_path / "missing.yaml", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        assert main([flag, str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert f"{path}: cannot read the config file: {reason}" in err.splitlines()[0]
        assert "Traceback" not in err


def test_invalid_config_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running with an invalid --config prints every error and exits 1 before binding."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, "utf-8")
    assert main(["--config", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[:-1] == BAD_ERRORS
    assert lines[-1] == "proxyd: refusing to start with an invalid config"


def test_bad_listen_flag_refuses_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid --listen override is a config error naming the key, exit 1."""
    assert main(["--listen", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert "listen[0]: 'nowhere' is not HOST:PORT" in err
    assert err.splitlines()[-1] == "proxyd: refusing to start with an invalid config"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"proxyd {__version__}"


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2_sha256"])
def test_hash_password_stdin(
    scheme: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hash-password --stdin prints a hash verify_password accepts and auth.users takes."""
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))
    assert main(["hash-password", "--stdin", "--scheme", scheme]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    stored = out.strip()
    assert out == stored + "\n"
    assert stored.startswith(scheme + "$")
    assert "correct horse" not in stored
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horse\n")
    assert not verify_password(stored, "wrong")
    config = parse_config_text(f"auth:\n  users:\n    alice: '{stored}'\n", "auth.yaml")
    assert config.auth.users == {"alice": stored}


def test_hash_password_salts_every_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same password hashed twice gives two different hashes (random salt)."""
    hashes = []
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("same\n"))
        assert main(["hash-password", "--stdin"]) == 0
        hashes.append(capsys.readouterr().out.strip())
    assert hashes[0] != hashes[1]
    assert all(verify_password(stored, "same") for stored in hashes)


def test_hash_password_refuses_an_empty_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty password on stdin exits 1 and prints no hash."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["hash-password", "--stdin"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "empty password" in err
