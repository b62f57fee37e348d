"""`twistd mta` as an operator starts it: the plugin is found from any
folder (TWISTED-NOTES.md, "The twistd plugin and editable installs"), and
a bad configuration stops it with exit status 1 and the error naming file,
key and value, before anything listens (seen with strace: no listen()
system call at all).

The listener in the bad file is 127.0.12.30, an address no other test
file uses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.relay import TWISTD, base_config, free_port


def test_twistd_finds_the_plugin_from_another_folder(tmp_path: Path) -> None:
    done = subprocess.run([str(TWISTD), "mta", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert "--config=" in done.stdout
    assert "the configuration file" in done.stdout


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="strace (scripts/debian-packages) is not installed")
def test_a_bad_configuration_stops_twistd_before_anything_listens(
    tmp_path: Path, relay_cert: Any
) -> None:
    config = base_config(
        tmp_path, relay_cert.chain, relay_cert.key,
        listeners=[{"name": "mx", "address": "127.0.12.30",
                    "port": free_port("127.0.12.30"), "role": "inbound"}],
        delivery={"max_lifetime": "soon"},
    )
    path = tmp_path / "mta.yaml"
    path.write_text(yaml.safe_dump(config))
    trace = tmp_path / "trace"

    done = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=listen", "-o", str(trace),
         str(TWISTD), "--nodaemon", "--pidfile=", "mta", "--config", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert done.returncode == 1, done
    assert done.stderr.startswith("mta: not started: bad configuration\n")
    assert (f"{path}: delivery.max_lifetime: expected a duration such as 30s, "
            "10m, 4h or 5d (got 'soon')") in done.stderr
    assert listens(trace) == []
    assert not (tmp_path / "spool").exists()  # nor was the spool made

    # The same trace of a program that does listen shows it: the empty
    # list above is not strace missing the call.
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=listen", "-o", str(trace),
         sys.executable, "-c", "import socket; s = socket.socket(); "
         "s.bind(('127.0.12.30', 0)); s.listen()"], check=True, timeout=60)
    assert len(listens(trace)) == 1


def listens(trace: Path) -> list[str]:
    return [line for line in trace.read_text().splitlines()
            if "listen(" in line]
