"""Every example in every ``--help`` and every line of the README's command
lists runs (issue 18): the examples are read from the real ``--help`` output
and from README.md, then run with bash against a copy of the bundled layout
(``oci:./layout:TAG``, with an extra tag ``app`` = ``mini-gzip``) and a private
loopback registry loaded with the names the examples use.

Adaptations, and nothing else: a registry host (``localhost:5000``,
``ghcr.io``, ...) becomes the loopback registry's; ``/mnt/X`` a directory under
the test's tmp dir; ``login`` gets ``--password-stdin`` (and ``-u alice``) with
the test user's password on stdin, against the htpasswd registry with a
private keyring; a mount made by an example is unmounted after it; an
``unmount`` example gets a mount to unmount first. A synopsis line of the
README (``ls IMAGE [--layer N|DIGEST] [PATH] ...``) runs twice: without the
bracketed options and with all of them, placeholders filled in."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from fixture_truth import LAYOUT, REPO
from fuse_helpers import isolated_mount_env, push_layout
from registry_fixtures import TEST_USERS
from registry_helpers import Registry, push_fixtures

from bench.userland import write_userland_layout
from core import mount as core_mount

BIN = os.path.dirname(sys.executable)
README = os.path.join(REPO, "README.md")
# names the examples pull from a registry -> the fixture tag pushed there
REGISTRY_IMAGES = {"app:esgz": "mini-esgz", "org/app:esgz": "mini-esgz",
                   "stargz-containers/alpine:3.19": "mini-esgz-64k"}
EXTERNAL_HOSTS = ("localhost:5000", "ghcr.io", "registry.example.com", "quay.io", "docker.io")


def _help(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "stargz_tui", *args, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout


def _commands() -> list[str]:
    top = _help()
    block = top.split("positional arguments:", 1)[1].split("\noptions:", 1)[0]
    return re.findall(r"^    ([a-z]+)", block, flags=re.M)


def help_examples() -> list[tuple[str, str]]:
    """(command, example) for every ``stargz-tui ...`` line of an ``examples:``
    block in ``stargz-tui COMMAND --help``; a trailing description (after two
    spaces or more) is not part of the command."""
    out = []
    for cmd in _commands():
        text = _help(cmd)
        if "examples:" not in text:
            continue
        block = text.split("examples:", 1)[1].split("\n\n", 1)[0]
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("stargz-tui ", "echo ", "source <(stargz-tui ")):
                out.append((cmd, re.split(r"\s{2,}", line)[0]))
    return out


def readme_synopses() -> list[str]:
    """The command lines of the README's Commands and Mounting ``sh`` blocks
    (comments dropped); the first block (setup) is not a command list."""
    text = open(README, encoding="utf-8").read()
    lines = []
    for section in ("## Commands", "## Mounting"):
        body = text.split(section, 1)[1]
        block = body.split("```sh\n", 1)[1].split("```", 1)[0]
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


# -- synopsis -> concrete commands ------------------------------------------------
OPTION_VALUES = {"--layer": "0", "--platform": "linux/amd64", "--chunk-size": "64K",
                 "--prioritize-file": "etc/os-release,data/new.txt", "-u": "USER",
                 "--estargz-chunk-size": "64K", "--cache-size": "1G",
                 "--estargz-record-in": "record.json", "--read-timeout": "30"}
PLACEHOLDERS = {"IMAGE": "oci:./layout:mini-esgz", "SRC": "oci:./layout:app",
                "DST": "oci:./out:app-esgz", "PATH": "etc/os-release",
                "REGISTRY": "localhost:5000", "MOUNTPOINT": "/mnt/syn"}


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur, i = [], 0, "", 0
    while i < len(text):
        if text.startswith(sep, i) and depth == 0:
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        cur += text[i]
        i += 1
    return parts + [cur]


def _fill(command: str, keep_optional: bool) -> str:
    tokens = re.findall(r"\[[^\]]*\]|\S+", command)
    words: list[str] = []
    for tok in tokens:
        if tok.startswith("["):
            if not keep_optional:
                continue
            inner = tok[1:-1].split()
        else:
            inner = [tok]
        for w in inner:
            prev = words[-1] if words else ""
            if prev in OPTION_VALUES and not w.startswith("-"):
                w = OPTION_VALUES[prev]
            elif w.split("|")[0] in PLACEHOLDERS:
                w = PLACEHOLDERS[w.split("|")[0]]
            elif "|" in w:  # alternatives: the first
                w = w.split("|")[0]
            words.append(w)
    return " ".join(words)


def expand_synopsis(line: str) -> list[str]:
    out = []
    for part in _split_top(line, " | "):
        part = part.strip()
        if not part.startswith("stargz-tui "):
            part = "stargz-tui " + part
        for keep in (False, True):
            cmd = _fill(part, keep)
            if cmd not in out:
                out.append(cmd)
    return out


def all_examples() -> list:
    params = []
    for cmd, ex in help_examples():
        params.append(pytest.param(ex, id=f"help-{cmd}:{ex[11:60]}"))
    for line in readme_synopses():
        for ex in expand_synopsis(line):
            params.append(pytest.param(ex, id=f"readme:{ex[11:60]}"))
    return params


EXAMPLES = all_examples()


# -- the world the examples run in ------------------------------------------------
def _add_tag(layout: str, tag: str, like: str) -> None:
    path = os.path.join(layout, "index.json")
    with open(path) as f:
        index = json.load(f)
    src = next(m for m in index["manifests"]
               if m["annotations"]["org.opencontainers.image.ref.name"] == like)
    index["manifests"].append(dict(src, annotations={"org.opencontainers.image.ref.name": tag}))
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="module")
def example_registry(tmp_path_factory):
    reg = Registry(str(tmp_path_factory.mktemp("examples-registry"))).start()
    try:
        push_fixtures(reg.host, ["mini-esgz"])  # fixtures/mini:mini-esgz
        for name, tag in REGISTRY_IMAGES.items():
            push_layout(LAYOUT, tag, f"{reg.host}/{name}")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _adapt(example: str, sub: str, tmp: str, host: str) -> tuple[str, str | None]:
    """The example as run here, and the stdin it gets."""
    cmd = example
    for h in EXTERNAL_HOSTS:
        cmd = re.sub(re.escape(h) + r"(?=[/\s]|$)", host, cmd)
    cmd = cmd.replace("oci:tests/fixtures/estargz-oci", f"oci:{LAYOUT}")
    cmd = re.sub(r"(?<![\w.])(~|\$HOME)?/mnt/", f"{tmp}/mnt/", cmd)
    stdin = None
    if sub == "login":
        # no terminal here to type a password at: the password comes on stdin
        cmd = re.sub(r"-u (\S+)", "-u alice", cmd)
        cmd = re.sub(r"^echo \"\$TOKEN\" \| ", "", cmd)
        if "-u " not in cmd:
            cmd += " -u alice"
        if "--password-stdin" not in cmd:
            cmd += " --password-stdin"
        stdin = TEST_USERS["alice"] + "\n"
    cmd = cmd.replace("-u USER", "-u alice")
    return cmd, stdin


def _mountpoints(cmd: str, tmp: str) -> list[str]:
    return re.findall(re.escape(tmp) + r"/mnt/[\w.-]+", cmd)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example, request, tmp_path, example_registry):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(LAYOUT, work / "layout")
    if " optimize " in f" {example} ":
        # optimize runs the image's command: `app` is a real (tiny) userland
        write_userland_layout(str(work / "layout"), programs=("sh", "cat"),
                              files={"etc/os-release": b'NAME="example userland"\n'},
                              config={"Entrypoint": ["/bin/cat", "/etc/os-release"]},
                              tag="app")
        (work / "app.json").write_text('{"path": "etc/os-release"}\n')
    else:
        _add_tag(str(work / "layout"), "app", "mini-gzip")
    # the record an example reads (as `ctr-remote optimize --record-out` writes it)
    (work / "record.json").write_text('{"path": "etc/os-release"}\n{"path": "data/text.txt"}\n')
    request.getfixturevalue("mount_env")  # private state, cache and runtime dirs
    path = BIN + os.pathsep + os.environ["PATH"]
    env = dict(os.environ, PATH=path)
    words = example.replace("<(", "").split()
    sub = next((w for w in words[words.index("stargz-tui") + 1:] if not w.startswith("-")), "")
    host = example_registry.host
    if sub in ("login", "logout"):
        env = dict(request.getfixturevalue("keyring_env"), PATH=path)
        host = request.getfixturevalue("basic_registry").host
    cmd, stdin = _adapt(example, sub, str(tmp_path), host)
    mps = _mountpoints(cmd, str(tmp_path))
    for mp in mps:
        os.makedirs(mp, exist_ok=True)
    if sub in ("unmount", "umount"):
        for mp in mps:  # something to unmount
            subprocess.run([sys.executable, "-m", "stargz_tui", "mount",
                            f"oci:{LAYOUT}:mini-esgz", mp, "--layer", "0"],
                           check=True, capture_output=True, timeout=120, env=env)
    env["TOKEN"] = TEST_USERS["alice"]
    try:
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=work, env=env,
                           input=stdin, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr
        if sub in ("mount",):
            assert all(core_mount.is_mounted(mp) for mp in mps), cmd
    finally:
        if sub == "mount":
            for mp in mps:
                core_mount.unmount(mp, force=True)


def test_examples_were_found():
    """The collection above read real examples: every command with an
    ``examples:`` block, and both README lists."""
    cmds = {c for c, _ in help_examples()}
    assert {"inspect", "ls", "cat", "verify", "convert", "repos", "tags", "login", "logout",
            "mount", "unmount", "mounts", "cache", "completion"} <= cmds, cmds
    assert len(readme_synopses()) >= 12
    assert len(EXAMPLES) >= 50
