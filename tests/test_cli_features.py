"""CLI features of issue 18 (points 10-13): verify --full progress on a
terminal only, ctr-remote's option names on convert, inspect --raw/--config
and the full history, unmount --all, shell completion. Real subprocesses, a
real pty, real FUSE mounts."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
import time

import pytest
from cli_helpers import stargz_cli
from fixture_truth import LAYOUT, REPO, cli, config, ref
from fuse_helpers import isolated_mount_env
from registry_fixtures import run_cli

from core import mount as core_mount


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _on_pty(*args: str, timeout: float = 120) -> tuple[int, bytes]:
    """Run stargz-tui with stdout and stderr on a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "stargz_tui", *args])
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_verify_full_shows_progress_on_a_terminal_only():
    code, out = _on_pty("verify", ref("mini-esgz"), "--full")
    assert code == 0, out
    assert b"\rverify layer 0: reading blob" in out and b"\rverify layer 1:" in out, out
    assert b"100%" in out and b"all checks hold" in out
    code, out = _on_pty("verify", ref("mini-esgz"), "--full", "--json")
    assert code == 0 and b"verify layer" not in out and json.loads(out)["ok"] is True
    code, out = _on_pty("verify", ref("mini-esgz"), "--full", "-q")
    assert code == 0 and b"verify layer" not in out
    piped = cli("verify", ref("mini-esgz"), "--full")
    assert b"verify layer" not in piped.stderr and b"\r" not in piped.stdout + piped.stderr


def _convert(tmp_path, name: str, *opts: str) -> dict:
    dst = f"oci:{tmp_path}/out:{name}"
    r = cli("convert", ref("mini-gzip"), dst, "--json", *opts)
    return json.loads(r.stdout)


def test_convert_takes_ctr_remote_names_and_record_files(tmp_path):
    record = tmp_path / "record.json"
    record.write_text('{"path": "etc/os-release"}\n{"path": "data/text.txt"}\n'
                      '{"path": "etc/os-release"}\n')
    plain = tmp_path / "list.txt"
    plain.write_text("# prefetch\netc/os-release\ndata/text.txt\n")
    ours = _convert(tmp_path, "ours", "--chunk-size", "64K",
                    "--prioritize-file", "etc/os-release,data/text.txt")
    theirs = _convert(tmp_path, "theirs", "--estargz-chunk-size", "64K",
                      "--estargz-record-in", str(record))
    at_jsonl = _convert(tmp_path, "jsonl", "--chunk-size", "64K",
                        "--estargz-prioritized-files", f"@{record}")
    at_plain = _convert(tmp_path, "plain", "--chunk-size", "64K", "--prioritize-file", f"@{plain}")
    assert ours["manifestDigest"] == theirs["manifestDigest"] == at_jsonl["manifestDigest"] \
        == at_plain["manifestDigest"]
    default = _convert(tmp_path, "default")
    assert default["manifestDigest"] != ours["manifestDigest"]
    info = json.loads(cli("inspect", f"oci:{tmp_path}/out:theirs", "--json").stdout)
    assert info["layers"][0]["prefetchSize"]  # the record's files went before the landmark
    first = json.loads(cli("ls", f"oci:{tmp_path}/out:theirs", "--layer", "0", "-R",
                           "--json").stdout)
    assert {"etc/os-release", "data/text.txt"} <= {r["path"] for r in first}


def test_convert_refuses_tiny_chunks_and_takes_zstdchunked(tmp_path):
    for size in ("1K", "4095", "512"):
        r = cli("convert", ref("mini-gzip"), f"oci:{tmp_path}/o:x", "--chunk-size", size,
                check=False)
        err = r.stderr.decode()
        assert r.returncode == 2 and "minimum of 4K" in err and err.count("\n") == 1, err
    assert cli("convert", ref("mini-gzip"), f"oci:{tmp_path}/o:x", "--chunk-size", "4K",
               "-q").returncode == 0
    # ctr-remote's --zstdchunked is our --format zstd:chunked
    assert cli("convert", ref("mini-gzip"), f"oci:{tmp_path}/o:z", "--zstdchunked",
               "-q").returncode == 0
    out = json.loads(cli("inspect", f"oci:{tmp_path}/o:z", "--json").stdout)
    assert {la["format"] for la in out["layers"]} == {"zstdchunked"}
    bad = tmp_path / "bad.json"
    bad.write_text('{"path": "etc/os-release"}\nnot json\n')
    r = cli("convert", ref("mini-gzip"), f"oci:{tmp_path}/o:y", "--estargz-record-in", str(bad),
            check=False)
    assert r.returncode == 1 and b"bad.json:2: not a JSON line" in r.stderr
    helptext = cli("convert", "--help").stdout.decode()
    assert "registry" in helptext and "--estargz-record-in" in helptext


def _blob(digest: str) -> bytes:
    with open(os.path.join(LAYOUT, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
        return f.read()


def test_inspect_raw_config_and_history():
    data = json.loads(cli("inspect", ref("mini-esgz"), "--json").stdout)
    raw = cli("inspect", ref("mini-esgz"), "--raw").stdout
    assert raw == _blob(data["manifestDigest"])
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == data["manifestDigest"]
    cfg = cli("inspect", ref("mini-esgz"), "--config").stdout
    assert cfg == _blob(data["configDigest"])
    assert data["history"] == config("mini-esgz")["history"] and data["history"]
    assert data["config"]["history"] == len(data["history"])
    r = cli("inspect", ref("mini-esgz"), "--raw", "--config", check=False)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1


@pytest.mark.registry
def test_inspect_raw_from_a_registry_is_the_served_manifest(registry, isolated_env):
    reg_ref = registry.ref("mini-esgz")
    r = subprocess.run([sys.executable, "-m", "stargz_tui", "inspect", reg_ref, "--raw"],
                       env=isolated_env, capture_output=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "sha256:" + hashlib.sha256(r.stdout).hexdigest() == registry.digests["mini-esgz"]
    cfg = json.loads(run_cli(["inspect", reg_ref, "--config"], isolated_env).stdout)
    assert cfg == config("mini-esgz")


@pytest.mark.fuse
def test_unmount_all(mount_env):
    a, b = mount_env.mountpoint("a"), mount_env.mountpoint("b")
    mount_env.cli("mount", ref("mini-esgz"), a, "--layer", "0", check=True)
    mount_env.cli("mount", ref("mini-esgz"), b, "--layer", "1", check=True)
    busy = open(os.path.join(a, "etc/os-release"), "rb")
    try:
        r = mount_env.cli("unmount", "--all")
        assert r.returncode == 1 and a in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert f"unmounted {b}" in r.stdout
        assert core_mount.is_mounted(a) and not core_mount.is_mounted(b)
        r = mount_env.cli("unmount", "--all", "--force")
        assert r.returncode == 0 and f"unmounted {a}" in r.stdout, r.stderr
    finally:
        try:
            busy.close()
        except OSError:  # the mount was forced away under it
            pass
    assert not core_mount.is_mounted(a) and core_mount.list_mounts() == []
    r = mount_env.cli("unmount", "--all")
    assert r.returncode == 0 and "no mounts" in r.stdout
    for bad in (["unmount"], ["unmount", "--all", a]):
        r = mount_env.cli(*bad)
        assert r.returncode == 1 and "MOUNTPOINT or --all" in r.stderr


def _complete(script: str, words: list[str]) -> list[str]:
    """Run the bash completion function as bash would for ``words`` (the
    last one being completed)."""
    arr = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(["bash", "-c", f'source "{script}"; COMP_WORDS=({arr}); '
                        f"COMP_CWORD={len(words) - 1}; _stargz_tui; "
                        'printf "%s\\n" "${COMPREPLY[@]}"'],
                       capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.split()


def test_completion_scripts(tmp_path):
    scripts = {}
    for shell in ("bash", "zsh", "fish"):
        out = cli("completion", shell).stdout
        path = tmp_path / f"c.{shell}"
        path.write_bytes(out)
        scripts[shell] = str(path)
    checks = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}
    for shell, argv in checks.items():
        assert shutil.which(argv[0]), f"{argv[0]} is installed by scripts/setup"
        r = subprocess.run(argv + [scripts[shell]], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (shell, r.stderr)
    bash = scripts["bash"]
    assert _complete(bash, ["stargz-tui", "lo"]) == ["login", "logout"]
    assert "completion" in _complete(bash, ["stargz-tui", ""])
    assert _complete(bash, ["stargz-tui", "ls", "IMG", "--j"]) == ["--json"]
    assert _complete(bash, ["stargz-tui", "convert", "--estargz-r"]) == ["--estargz-record-in"]
    assert _complete(bash, ["stargz-tui", "cache", "p"]) == ["prune"]
    assert _complete(bash, ["stargz-tui", "completion", "z"]) == ["zsh"]
    assert "--all" in _complete(bash, ["stargz-tui", "unmount", "--"])
    # zsh really loads it: the function and its registration exist afterwards
    r = subprocess.run(["zsh", "-f", "-c", f"autoload -U compinit && compinit -u; "
                        f"source {scripts['zsh']}; whence -w _stargz_tui"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "function" in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run(["fish", "-c", f"source {scripts['fish']}; "
                        "complete -C 'stargz-tui unmount --a'"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--all" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.fuse
@pytest.mark.registry
def test_mount_insecure_registry(mount_env, registry, tmp_path, monkeypatch):
    # the registries config says this loopback registry serves TLS: plain HTTP
    # to it needs --insecure-registry, as it would for a LAN host
    conf = tmp_path / "registries.toml"
    conf.write_text(f'[registries."{registry.host}"]\ntls = true\n')
    monkeypatch.setenv("STARGZ_TUI_REGISTRIES_CONFIG", str(conf))
    image = registry.ref("mini-esgz")
    for extra in ([], ["--layer", "0"]):
        mp = mount_env.mountpoint("m" + "".join(extra).replace("-", ""))
        r = mount_env.cli("mount", image, mp, *extra)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
        assert not core_mount.is_mounted(mp)
        mount_env.cli("mount", image, mp, *extra, "--insecure-registry", registry.host,
                      check=True)
        with open(os.path.join(mp, "etc/os-release"), "rb") as f:
            assert f.read()
        mount_env.cli("unmount", mp, check=True)


@pytest.mark.fuse
def test_layer_daemons_are_named_in_ps(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", ref("mini-esgz"), mp, "--layer", "1", check=True)
    pid = json.loads(mount_env.cli("mounts", "--json", check=True).stdout)[0]["pid"]
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "stargz-tui-daem"  # the kernel keeps 15 bytes
    ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                        timeout=30, check=True).stdout.strip()
    assert ps == f"stargz-tui-daemon layer 1 {mp}", ps
    mount_env.cli("unmount", mp, check=True)


@pytest.mark.fuse
def test_busy_message_does_not_name_our_own_process(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", ref("mini-esgz"), mp, "--layer", "0", check=True)
    holder = subprocess.Popen(["sleep", "60"], cwd=os.path.join(mp, "data"))
    try:
        # run from inside the mount: our own cwd is the reason, said as such
        r = stargz_cli("unmount", mp, cwd=mp, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
        assert r.returncode == 1 and "working directory of this command" in r.stderr, r.stderr
        assert "pid" not in r.stderr and r.stderr.count("\n") == 1
        with open(os.path.join(mp, "etc/os-release"), "rb") as stdin:
            r = stargz_cli("unmount", mp, stdin=stdin, timeout=60)
        assert r.returncode == 1 and "standard input of this command" in r.stderr, r.stderr
        # from outside: the other holder is named, this command is not
        r = mount_env.cli("unmount", mp)
        assert r.returncode == 1 and f"pid {holder.pid} (sleep" in r.stderr, r.stderr
        assert r.stderr.count("pid ") == 1
    finally:
        holder.kill()
        holder.wait()
    mount_env.cli("unmount", mp, check=True)
