"""Reference normalisation, as containerd and skopeo spell references."""

import pytest

from core.errors import ReferenceError_
from core.reference import is_loopback_host, parse_reference, parse_registry


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest",
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu:1", "docker.io", "library/ubuntu", "1", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("ghcr.io/org/app:tag", "ghcr.io", "org/app", "tag", None),
        ("localhost:5000/repo", "localhost:5000", "repo", "latest", None),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", None),
        ("docker://quay.io/org/x:1", "quay.io", "org/x", "1", None),
        ("quay.io/org/x@sha256:" + "a" * 64, "quay.io", "org/x", None, "sha256:" + "a" * 64),
        ("quay.io/org/x:1@sha256:" + "b" * 64, "quay.io", "org/x", "1", "sha256:" + "b" * 64),
    ],
)
def test_registry_references_normalise(text, registry, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag, ref.digest) == (
        "docker", registry, repo, tag, digest)
    # The normalised form parses back to itself.
    assert parse_reference(str(ref)) == ref


def test_docker_hub_hosts_and_credential_key():
    ref = parse_reference("alpine")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.credential_key == "https://index.docker.io/v1/"
    other = parse_reference("localhost:5000/x")
    assert other.api_host == "localhost:5000" and other.credential_key == "localhost:5000"
    assert ref.selector == "latest"
    assert parse_reference("x@sha256:" + "c" * 64).selector == "sha256:" + "c" * 64


@pytest.mark.parametrize(
    "text, layout, tag, digest",
    [
        ("oci:/tmp/layout", "/tmp/layout", None, None),
        ("oci:/tmp/layout:mini-esgz", "/tmp/layout", "mini-esgz", None),
        ("oci:rel/dir:v1", "rel/dir", "v1", None),
        ("oci:/l@sha256:" + "d" * 64, "/l", None, "sha256:" + "d" * 64),
    ],
)
def test_oci_layout_references(text, layout, tag, digest):
    ref = parse_reference(text)
    assert ref.is_oci_layout
    assert (ref.layout_dir, ref.tag, ref.digest) == (layout, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    ["", "UPPER/case", "repo:bad tag", "repo@sha256:xyz", "oci:", "a//b", "host:99999999999/x:"],
)
def test_bad_references_are_one_clear_error(text):
    with pytest.raises(ReferenceError_) as info:
        parse_reference(text)
    assert "\n" not in str(info.value) and str(info.value)


def test_registry_names_and_loopback():
    assert parse_registry("https://index.docker.io/v1/") == "docker.io"
    assert parse_registry("localhost:5000") == "localhost:5000"
    assert is_loopback_host("127.0.0.1:5000") and is_loopback_host("localhost")
    assert is_loopback_host("[::1]:5000")
    assert not is_loopback_host("ghcr.io") and not is_loopback_host("10.0.0.1:5000")
