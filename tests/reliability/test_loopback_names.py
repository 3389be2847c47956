"""Only literal loopback addresses (and exactly ``localhost``) get plain HTTP.

``127.attacker.example`` and ``x.localhost`` are names: DNS decides where they
go, so they must get TLS like any other host, and no Basic credentials may
travel to them in clear. The end-to-end case resolves such a name to the real
test registry through a private /etc/hosts (a bind mount in a mount namespace
of its own, so nothing outside the test sees it) and records every byte the
CLI sends through a loopback forwarder in front of the registry.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from core.reference import is_loopback_host

pytestmark = [pytest.mark.reliability]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOPBACK = ["127.0.0.1", "127.0.0.1:5000", "127.9.8.7:1", "localhost", "LOCALHOST:5000",
            "::1", "[::1]", "[::1]:5000"]
NOT_LOOPBACK = ["127.attacker.example", "127.attacker.example:5000", "127.0.0.1.nip.io",
                "x.localhost", "x.localhost:5000", "localhost.attacker.example",
                "localhost.", "127.1", "0.0.0.0", "10.0.0.1:5000", "ghcr.io",
                "[::ffff:127.0.0.1]:5000", "[fe80::1]", "[::1]junk", "localhost:http"]


def test_loopback_is_literal(rel):
    wrong = [h for h in LOOPBACK if not is_loopback_host(h)]
    wrong += [h for h in NOT_LOOPBACK if is_loopback_host(h)]
    assert not wrong, wrong
    rel.row("security", "registry hosts named like loopback (`127.attacker.example`, "
            "`x.localhost`, `127.0.0.1.nip.io`, `localhost.`)",
            "not loopback: only literal 127.0.0.0/8, ::1 and exactly `localhost` get plain "
            f"HTTP ({len(LOOPBACK)} loopback / {len(NOT_LOOPBACK)} other spellings checked)")


class RecordingForwarder:
    """127.0.0.1:PORT -> ``upstream``; keeps every byte clients send."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream, timeout=30)
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src, dst, record: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("name", ["127.attacker.example", "x.localhost"])
def test_no_plain_http_credentials_to_loopback_lookalike(name, basic_registry, isolated_env,
                                                         tmp_path, rel):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) for a private /etc/hosts (CI runs as root)")
    fwd = RecordingForwarder(basic_registry.host)
    try:
        host = f"{name}:{fwd.port}"
        user, password = next(iter(basic_registry.users.items()))
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        with open(os.path.join(isolated_env["DOCKER_CONFIG"], "config.json"), "w") as f:
            json.dump({"auths": {host: {"auth": auth}}}, f)
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {name}\n")
        script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             str(hosts), sys.executable, "-m", "stargz_tui", "inspect",
             f"{host}/fixtures/mini:mini-esgz"],
            env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=120)
        with fwd.lock:
            sent = bytes(fwd.sent)
    finally:
        fwd.close()
    assert sent, "the CLI never connected: the private /etc/hosts did not take effect"
    assert auth.encode() not in sent and b"Authorization" not in sent, sent[:400]
    assert not sent.startswith((b"GET ", b"HEAD ")), sent[:200]
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stargz-tui: "), r.stderr
    assert "Traceback" not in r.stderr
    rel.row("security", f"registry `{name}:PORT` resolving to a real Basic-auth registry on "
            "127.0.0.1 (private /etc/hosts), credentials configured for it",
            f"TLS attempted, never plain HTTP; no credentials on the wire; one line: "
            f"{lines[0][:90]}")
