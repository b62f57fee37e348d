"""The `mta` command, run as an operator runs it: a real process, real files."""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from mta.envelope import Attempt, Client, Envelope, Recipient, TLSFacts
from mta.spool import Spool
from tests.peers import certs

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
    Spool(config.parent / "spool").create()
    done = run("--config", str(config), "queue", "show", "0123ABC")

    assert done.returncode == 1
    assert "0123ABC: no such message" in done.stderr


def test_queue_show_refuses_what_is_not_a_queue_id(config: Path) -> None:
    # A queue id becomes a file name: a path must never get that far.
    Spool(config.parent / "spool").create()
    done = run("--config", str(config), "queue", "show", "../../mta")

    assert done.returncode == 1
    assert "../../mta: not a queue id" in done.stderr


# --- check-config: hints that fit, warnings ----------------------------------


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A folder another user can reach (tmp_path's parents are root's)."""
    folder = Path(tempfile.mkdtemp(prefix="mta-cli-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_another_user() -> list[str]:
    """Run as nobody when we are root (root reads every file)."""
    if os.geteuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody").pw_uid
    nogroup = grp.getgrnam("nogroup").gr_gid
    return ["setpriv", f"--reuid={nobody}", f"--regid={nogroup}",
            "--clear-groups"]


def test_a_key_that_cannot_be_read_says_who_must_read_it(
    reachable: Path,
) -> None:
    config = reachable / "mta.yaml"
    config.write_text(
        "hostname: relay.test\nspool: spool\n"
        "tls: {certificate: tls/relay.crt, private_key: tls/relay.key}\n"
        "listeners: [{name: mx, address: 127.0.0.1, port: 2525, role: inbound}]\n"
    )
    config.chmod(0o644)
    files = certs.write_cert_files(certs.issue_server_cert("relay.test"),
                                   reachable / "tls", stem="relay")
    (reachable / "tls").chmod(0o755)
    files.key.chmod(0o600 if os.geteuid() == 0 else 0o000)

    done = subprocess.run(
        [*as_another_user(), *MTA, "--config", str(config), "check-config"],
        capture_output=True, text=True, timeout=60, cwd="/")

    assert done.returncode == 1, done
    [problem] = done.stdout.splitlines()
    assert problem.startswith(f"{config}: tls.private_key: cannot read "
                              f"{files.key}: Permission denied; this check "
                              "runs as "), problem
    assert "let the user that starts the relay read it" in problem
    assert "chmod 600" in problem
    assert "make-cert" not in problem and "fix the path" not in problem


@pytest.mark.parametrize("present", ["relay.crt", "relay.key"])
def test_half_a_pair_is_not_told_to_run_make_cert(
    config: Path, present: str
) -> None:
    assert run("--config", str(config), "make-cert").returncode == 0
    tls = config.parent / "tls"
    missing = {"relay.crt": "relay.key", "relay.key": "relay.crt"}[present]
    (tls / missing).unlink()

    done = run("--config", str(config), "check-config")

    assert done.returncode == 1
    [problem] = done.stdout.splitlines()
    key = "private_key" if missing == "relay.key" else "certificate"
    other = "certificate" if key == "private_key" else "private_key"
    assert (f"tls.{key}: cannot read {tls / missing}: No such file or "
            f"directory; tls.{other} {tls / present} exists: put its "
            ) in problem, problem
    assert "`mta make-cert` writes a pair only when neither file exists" \
        in problem
    # What it says is true: make-cert refuses half a pair.
    assert run("--config", str(config), "make-cert").returncode == 1


def test_neither_file_is_told_to_run_make_cert(config: Path) -> None:
    done = run("--config", str(config), "check-config")
    assert done.returncode == 1
    for problem in done.stdout.splitlines():
        assert problem.endswith("fix the path, or run `mta make-cert` for a "
                                "self-signed pair to try the relay with")


def write_pair(config: Path, *names: str, days: float = 90) -> None:
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    certs.write_cert_files(certs.issue_server_cert(*names, not_after=not_after),
                           config.parent / "tls", stem="relay")


def test_check_config_warns_of_expiry_and_a_hostname_not_on_the_certificate(
    config: Path,
) -> None:
    write_pair(config, "mail.example.net", days=2.5)

    done = run("--config", str(config), "check-config")

    assert done.returncode == 0, done.stdout
    ok, *warnings = done.stdout.splitlines()
    assert ok == "ok"
    crt = config.parent / "tls" / "relay.crt"
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"warning: {config}: tls.certificate {crt} "
                                  "expires on ")
    assert "(in 2 days and 11 hours); renew it" in warnings[0]
    assert warnings[1] == (
        f"warning: {config}: hostname relay.test is not a name on "
        f"tls.certificate {crt} (it names mail.example.net): a client that "
        "checks the relay's name refuses it; use a certificate for that "
        "name, or set hostname to one of its names (the relay runs with it "
        "anyway)")


@pytest.mark.parametrize(("hostname", "names"), [
    ("relay.test", ("relay.test",)),
    ("mx1.relay.test", ("other.test", "*.relay.test")),
], ids=["exact", "wildcard"])
def test_a_certificate_that_names_the_host_gives_no_warning(
    config: Path, hostname: str, names: tuple[str, ...]
) -> None:
    config.write_text(config.read_text().replace("relay.test", hostname))
    write_pair(config, *names)
    done = run("--config", str(config), "check-config")
    assert (done.returncode, done.stdout) == (0, "ok\n")


# --- mta queue with a broken file, or no spool -------------------------------


def queued_message(spool: Spool) -> str:
    spool.create()
    writer = spool.new_message()
    writer.write(b"Subject: waiting\r\n\r\nbody\r\n")
    writer.commit(Envelope(
        writer.queue_id, "alice@org.test", time.time(), writer.size,
        Client("client.test", "unknown", "127.0.0.1", "mx", None),
        (Recipient("bob@dest.test", "pending"),),
    ))
    return writer.queue_id


def test_the_queue_commands_work_after_a_typo_elsewhere(config: Path) -> None:
    queue_id = queued_message(Spool(config.parent / "spool"))
    config.write_text(config.read_text()
                      + "delivery: {max_lifetime: soon}\nlimtis: {}\n")

    listed = run("--config", str(config), "queue", "list")
    held = run("--config", str(config), "queue", "hold", queue_id, "--json")
    shown = run("--config", str(config), "queue", "show", queue_id, "--json")

    for done in (listed, held, shown):
        assert done.returncode == 0, done.stderr
        assert done.stderr.startswith(f"mta: warning: {config} has problems")
        assert "delivery.max_lifetime: expected a duration" in done.stderr
        assert "limtis: unknown key" in done.stderr
    assert queue_id in listed.stdout
    assert json.loads(held.stdout)[0]["status"] == "done"
    assert json.loads(shown.stdout)["hold"] is True


@pytest.mark.parametrize("spool_line", [
    "spool: [not, a, path]\n",
    "spool: spool\nspool: other\n",
], ids=["not-a-path", "twice"])
def test_a_broken_spool_setting_stops_the_queue_commands(
    config: Path, spool_line: str
) -> None:
    queued_message(Spool(config.parent / "spool"))
    config.write_text(config.read_text().replace("spool: spool\n", spool_line))

    done = run("--config", str(config), "queue", "list")

    assert done.returncode == 1
    assert done.stdout == ""
    assert f"{config}: spool: " in done.stderr


def test_a_spool_that_does_not_exist_is_not_an_empty_queue(config: Path) -> None:
    listed = run("--config", str(config), "queue", "list")
    as_json = run("--config", str(config), "queue", "list", "--json")
    (config.parent / "spool").mkdir()
    not_used = run("--config", str(config), "queue", "list")

    spool = config.parent / "spool"
    for done in (listed, as_json):
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (f"mta: spool {spool}: no such folder; check the "
                               "spool setting (the relay creates it at its "
                               "first start)\n")
    assert not_used.returncode == 1
    assert "no queue/ folder in it" in not_used.stderr
