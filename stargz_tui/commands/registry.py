"""Registry subcommands: ``repos``, ``tags``, ``login``, ``logout``.

Also :func:`add_registry_options` / :func:`registry_options`, which other
command groups use to give their commands ``--insecure-registry``.
"""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import AuthError, CoreError

from ..mountargs import positive_seconds
from ..textsafe import safe

# core.reference and getpass are imported where used: `mount` imports this
# module for its registry options, and its start-up is on the B1 path


class UsageError(CoreError):
    """A command was given inconsistent input."""


def seconds_arg(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        return positive_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="allow plain HTTP to HOST (loopback hosts never need this); repeatable")
    p.add_argument("--timeout", type=seconds_arg, metavar="SECONDS",
                   help="give up on a registry request (retries and body included) after "
                        "SECONDS (default: request-timeout in registries.toml, else 60)")


def registry_options(args) -> dict:
    """Keyword arguments for ``open_store`` / ``RegistryStore`` from parsed args."""
    out: dict = {}
    hosts = list(getattr(args, "insecure_registry", None) or [])
    if hosts:
        out["insecure_registries"] = hosts
    if getattr(args, "timeout", None) is not None:
        out["deadline"] = args.timeout
    from core.options import Tuning  # the edge: the knobs come from our environment

    out["bulk_reads"] = Tuning.from_env().bulk_reads
    return out


def _client(registry: str, args, **kw):
    from core.registry import RegistryClient

    return RegistryClient(registry, **registry_options(args), **kw)


async def cmd_repos(args) -> int:
    from core.reference import parse_registry

    registry = parse_registry(args.registry)
    client = _client(registry, args)
    names, truncated = [], False
    try:
        async for name in client.iter_catalog(page_size=args.page_size):
            if args.limit is not None and len(names) >= args.limit:
                truncated = True
                break
            names.append(name)
            if not args.json:
                print(safe(name), flush=False)
    finally:
        await client.aclose()
    if args.json:
        json.dump({"registry": registry, "repositories": names, "truncated": truncated},
                  sys.stdout, indent=2)
        print()
    elif truncated:
        print(f"(stopped after {args.limit}; use --limit to see more)", file=sys.stderr)
    return 0


async def cmd_tags(args) -> int:
    from core.reference import parse_reference

    ref = parse_reference(args.image)
    if ref.is_oci_layout:
        from core.image import OCILayoutStore

        tags = OCILayoutStore(ref.layout_dir).tags()
        truncated = args.limit is not None and len(tags) > args.limit
        tags = tags[:args.limit] if args.limit is not None else tags
        name = f"oci:{ref.layout_dir}"
    else:
        client = _client(ref.registry, args)
        tags, truncated = [], False
        name = f"{ref.registry}/{ref.repository}"
        try:
            async for t in client.iter_tags(ref.repository, page_size=args.page_size):
                if args.limit is not None and len(tags) >= args.limit:
                    truncated = True
                    break
                tags.append(t)
        finally:
            await client.aclose()
    if args.json:
        json.dump({"repository": name, "tags": tags, "truncated": truncated}, sys.stdout,
                  indent=2)
        print()
    else:
        for t in tags:
            print(safe(t))
        if truncated:
            print(f"(stopped after {args.limit}; use --limit to see more)", file=sys.stderr)
    return 0


def _read_secret(args) -> tuple[str, str]:
    username = args.username
    if not username:
        if not sys.stdin.isatty() or args.password_stdin:
            raise UsageError("no username: pass -u USER")
        username = input("Username: ").strip()
    if args.password_stdin:
        secret = sys.stdin.read()
        secret = secret[:-1] if secret.endswith("\n") else secret
        secret = secret[:-1] if secret.endswith("\r") else secret
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the password: use --password-stdin")
        import getpass

        secret = getpass.getpass("Password: ")
    if not username or not secret:
        raise UsageError("username and password must not be empty")
    return username, secret


async def cmd_login(args) -> int:
    from core.reference import parse_registry
    from core.registry import credentials
    from core.registry.credentials import Credentials

    registry = parse_registry(args.registry)
    backend = credentials.secure_backend()  # fail early, before asking anything
    username, secret = _read_secret(args)
    creds = Credentials(username, secret, "login")
    client = _client(registry, args, credentials=creds, use_keyring=False)
    try:
        try:
            kind = await client.check_login()
        except AuthError:
            raise AuthError(f"login to {registry} failed: the registry rejected the "
                            f"credentials for user '{safe(username)}'") from None
    finally:
        await client.aclose()
    credentials.store(registry, creds)
    note = " (the registry does not require authentication)" if kind == "none" else ""
    name = type(backend).__module__.rsplit(".", 1)[-1]
    print(f"Login Succeeded: credentials for {registry} saved in the system keyring "
          f"({name}){note}")
    return 0


def cmd_logout(args) -> int:
    from core.reference import parse_registry
    from core.registry import credentials

    registry = parse_registry(args.registry)
    if credentials.delete(registry):
        print(f"Removed credentials for {registry} from the system keyring")
    else:
        print(f"Not logged in to {registry} (no stargz-tui keyring entry)")
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "repos", help="list the repositories of a registry (catalog)", formatter_class=fmt,
        description="List repositories with GET /v2/_catalog, following Link pagination.",
        epilog="examples:\n  stargz-tui repos localhost:5000\n"
               "  stargz-tui repos registry.example.com --limit 50 --json\n\n"
               "Many public registries (Docker Hub, GHCR) do not offer the catalog.")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, metavar="N", help="stop after N repositories")
    p.add_argument("--page-size", type=int, metavar="N", help="ask for N entries per page (n=)")
    add_registry_options(p)
    p.set_defaults(func=cmd_repos)

    p = subparsers.add_parser(
        "tags", help="list the tags of an image repository", formatter_class=fmt,
        description="List tags with GET /v2/NAME/tags/list, following Link pagination "
                    "(or the tags of an OCI layout).",
        epilog="examples:\n  stargz-tui tags ghcr.io/stargz-containers/alpine\n"
               "  stargz-tui tags localhost:5000/fixtures/mini --json\n"
               "  stargz-tui tags oci:tests/fixtures/estargz-oci")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, metavar="N", help="stop after N tags")
    p.add_argument("--page-size", type=int, metavar="N", help="ask for N entries per page (n=)")
    add_registry_options(p)
    p.set_defaults(func=cmd_tags)

    p = subparsers.add_parser(
        "login", help="check credentials and save them in the system keyring",
        formatter_class=fmt,
        description="Check USER's password or token against REGISTRY, then store it in the "
                    "system keyring (Secret Service, macOS Keychain, ...). Never written to a "
                    "plain file.",
        epilog="examples:\n  stargz-tui login ghcr.io -u octocat\n"
               "  echo \"$TOKEN\" | stargz-tui login quay.io -u 'org+robot' --password-stdin\n"
               "  stargz-tui login docker.io -u me")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password or token from standard input")
    add_registry_options(p)
    p.set_defaults(func=cmd_login)

    p = subparsers.add_parser(
        "logout", help="remove saved credentials from the system keyring", formatter_class=fmt,
        description="Remove stargz-tui's keyring entry for REGISTRY (docker/podman files are "
                    "left alone).",
        epilog="examples:\n  stargz-tui logout ghcr.io\n  stargz-tui logout localhost:5000")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)
