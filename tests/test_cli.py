"""The `mta` command, run as an operator runs it: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mta.envelope import Attempt, Client, Envelope, Recipient, TLSFacts
from mta.spool import Spool

MTA = [sys.executable, "-m", "mta"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTA, *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mta.yaml"
    path.write_text(
        "hostname: relay.test\n"
        "spool: spool\n"
        "tls: {certificate: tls/relay.crt, private_key: tls/relay.key}\n"
        "listeners: [{name: mx, address: 127.0.0.1, port: 2525, role: inbound}]\n"
    )
    return path


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_config_option_before_or_after_the_command(config: Path,
                                                   before: bool) -> None:
    args = (["--config", str(config), "make-cert"] if before
            else ["make-cert", "--config", str(config)])

    done = run(*args)

    assert done.returncode == 0, done.stderr
    assert (config.parent / "tls/relay.crt").exists()


def test_check_config_says_ok_or_lists_problems(config: Path) -> None:
    missing = run("--config", str(config), "check-config")
    assert missing.returncode == 1
    assert f"{config}: tls.certificate: cannot read" in missing.stdout

    assert run("--config", str(config), "make-cert").returncode == 0
    done = run("check-config", "--config", str(config))
    assert (done.returncode, done.stdout) == (0, "ok\n")


@pytest.mark.parametrize("present", ["relay.crt", "relay.key"])
def test_make_cert_never_overwrites_half_a_pair(config: Path,
                                                present: str) -> None:
    tls = config.parent / "tls"
    tls.mkdir()
    (tls / present).write_bytes(b"operator's precious file")

    done = run("--config", str(config), "make-cert")

    assert done.returncode == 1
    assert "exists but its pair does not" in done.stderr
    assert (tls / present).read_bytes() == b"operator's precious file"
    assert sorted(p.name for p in tls.iterdir()) == [present]


def test_queue_list_and_show(config: Path) -> None:
    spool = Spool(config.parent / "spool")
    spool.create()
    writer = spool.new_message()
    writer.write(b"Received: x\r\nSubject: hello there\r\n\r\nbody\r\n")
    attempt = Attempt(time=time.time(), status="deferred", dsn="4.4.1",
                      reply="connect to mx.dest.test[127.0.0.9]:25: refused",
                      policy="opportunistic", relay="mx.dest.test[127.0.0.9]:25")
    envelope = Envelope(
        writer.queue_id, "alice@org.test", time.time(), writer.size,
        Client("client.test", "unknown", "127.0.0.1", "mx",
               TLSFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
        (Recipient("bob@dest.test", "deferred", attempt.reply, "4.4.1",
                   time.time() + 60, (attempt,)),),
    )
    writer.commit(envelope)

    listing = run("--config", str(config), "queue", "list")
    shown = run("--config", str(config), "queue", "show", writer.queue_id)
    as_json = run("--config", str(config), "queue", "list", "--json")

    assert writer.queue_id in listing.stdout
    assert "deferred  <bob@dest.test> (connect to mx.dest.test" in listing.stdout
    assert "Subject: hello there" in shown.stdout
    assert "relay=mx.dest.test[127.0.0.9]:25" in shown.stdout
    assert "tls=TLSv1.3/TLS_AES_128_GCM_SHA256" in shown.stdout
    [entry] = json.loads(as_json.stdout)
    assert entry["recipients"][0]["history"][0]["dsn"] == "4.4.1"


def test_queue_show_of_an_unknown_id(config: Path) -> None:
    done = run("--config", str(config), "queue", "show", "0123ABC")

    assert done.returncode == 1
    assert "0123ABC: no such message" in done.stderr


def test_queue_show_refuses_what_is_not_a_queue_id(config: Path) -> None:
    # A queue id becomes a file name: a path must never get that far.
    done = run("--config", str(config), "queue", "show", "../../mta")

    assert done.returncode == 1
    assert "../../mta: not a queue id" in done.stderr
