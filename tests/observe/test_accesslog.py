"""The access log writes one line per request, as text or JSON, to stderr or a file."""

from __future__ import annotations

import json
from pathlib import Path

from proxyd.observe.accesslog import AccessLog, AccessRecord


def record() -> AccessRecord:
    return AccessRecord(
        conn_id=7,
        client="127.0.0.1",
        method="GET",
        url="http://a.test/x",
        status=200,
        bytes_in=3,
        bytes_out=1024,
        duration=0.0123,
        upstream="a.test:80",
        user="alice",
    )


def test_json_lines_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog("json", str(path))
    log.write(record())
    log.write(record())
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["status"] == 200 and entry["bytes_out"] == 1024 and entry["user"] == "alice"
    assert entry["duration_ms"] == 12.3 and entry["route"] == "DIRECT"
    assert entry["time"].endswith("Z")


def test_text_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog("text", str(path))
    log.write(record())
    log.close()
    line = path.read_text().strip()
    assert " c7 127.0.0.1 alice GET http://a.test/x 200 in=3 out=1024 12.3ms " in line
    assert "upstream=a.test:80 route=DIRECT cache=- error=-" in line
