"""The app's own settings: ``app.toml`` under the platformdirs config dir.

```toml
theme = "textual-dark"
recent_images = ["oci:/path/to/layout:tag", "ghcr.io/org/app:1.0"]
recent_registries = ["localhost:5000"]
registries = ["registry.example.com"]

[keys]            # binding id = keys (see `?` in the app for the ids)
verify = "V"
search = "slash,ctrl+f"
```

Registry settings (mirrors, insecure hosts) belong to the registry's own file
(``registries.toml``); credentials live in the keyring, never here.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

APP_NAME = "stargz-tui"
MAX_RECENT = 12


def config_dir() -> str:
    env = os.environ.get("STARGZ_TUI_CONFIG_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_config_dir(APP_NAME)


def _toml_str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(c if ord(c) >= 0x20 else f"\\u{ord(c):04x}" for c in out)
    return f'"{out}"'


@dataclass
class AppConfig:
    path: str | None = None
    theme: str = "textual-dark"
    recent_images: list[str] = field(default_factory=list)
    recent_registries: list[str] = field(default_factory=list)
    registries: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why the file could not be read (shown once)

    @classmethod
    def load(cls, path: str | None = None) -> AppConfig:
        path = path or os.path.join(config_dir(), "app.toml")
        cfg = cls(path=path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            return cfg
        except (OSError, tomllib.TOMLDecodeError) as e:
            cfg.error = f"cannot read {path}: {e}"
            return cfg

        def strings(key):
            v = doc.get(key, [])
            return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

        if isinstance(doc.get("theme"), str):
            cfg.theme = doc["theme"]
        cfg.recent_images = strings("recent_images")[:MAX_RECENT]
        cfg.recent_registries = strings("recent_registries")[:MAX_RECENT]
        cfg.registries = strings("registries")
        keys = doc.get("keys", {})
        if isinstance(keys, dict):
            cfg.keys = {k: v for k, v in keys.items() if isinstance(v, str)}
        return cfg

    def save(self) -> None:
        if not self.path:
            return
        lines = [f"theme = {_toml_str(self.theme)}"]
        for key in ("recent_images", "recent_registries", "registries"):
            vals = ", ".join(_toml_str(v) for v in getattr(self, key))
            lines.append(f"{key} = [{vals}]")
        if self.keys:
            lines.append("")
            lines.append("[keys]")
            for k, v in sorted(self.keys.items()):
                lines.append(f"{_toml_str(k)} = {_toml_str(v)}")
        text = "\n".join(lines) + "\n"
        try:
            # recent images and registries are the user's business: 0700 / 0600
            d = os.path.dirname(self.path)
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.stat(d)
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(d, 0o700)
            tmp = self.path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            pass  # settings are a convenience; never fail the app over them

    def remember_image(self, ref: str) -> None:
        _push(self.recent_images, ref)
        self.save()

    def remember_registry(self, reg: str) -> None:
        _push(self.recent_registries, reg)
        self.save()


def _push(items: list[str], value: str) -> None:
    if value in items:
        items.remove(value)
    items.insert(0, value)
    del items[MAX_RECENT:]
