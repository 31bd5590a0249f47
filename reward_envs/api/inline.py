"""Inline registrations: the manifest rendered as ``caravela-env.toml`` next to the sent files.

Only what a ``Manifest`` holds is rendered: strings, numbers, booleans, lists and tables.
TOML has no null, so a ``None`` inside an example's ``fields`` is refused (``ValueError``).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from reward_envs.manifest import Manifest, load_manifest

MANIFEST_FILE = "caravela-env.toml"


def _string(s: str) -> str:
    out = []
    for ch in s:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"string {s[:40]!r} holds a lone surrogate (not valid UTF-8)")
        if ch in '"\\' or code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_string(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"{v!r:.60} cannot be written to TOML (null and objects are not allowed)")


def manifest_toml(manifest: Manifest) -> str:
    """``caravela-env.toml`` text that ``load_manifest`` reads back as ``manifest``."""
    data = manifest.model_dump(exclude_none=True)
    examples = data.pop("examples", [])
    lines = [f"{k} = {_value(v)}" for k, v in data.items()]
    for ex in examples:
        lines += ["", "[[examples]]"]
        lines += [f"{k} = {_value(v)}" for k, v in ex.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_env(root: Path, manifest: Manifest, files: dict[str, str]) -> Path:
    """A fresh directory under ``root`` holding the manifest and ``files``; checked by reading
    it back. File names were validated by the request model (plain, relative)."""
    env_dir = root / f"{manifest.name}-{uuid.uuid4().hex[:12]}"
    env_dir.mkdir(parents=True)
    try:
        (env_dir / MANIFEST_FILE).write_text(manifest_toml(manifest), encoding="utf-8")
        for name, text in files.items():
            target = env_dir / name
            if env_dir.resolve() not in target.resolve().parents:  # belt and braces
                raise ValueError(f"file name {name!r} leaves the env directory")
            target.parent.mkdir(exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        if load_manifest(env_dir) != manifest:
            raise ValueError("the manifest does not survive a round trip through TOML")
    except OSError as e:  # e.g. "a" sent as a file and as a directory ("a/b.py")
        shutil.rmtree(env_dir, ignore_errors=True)
        raise ValueError(f"cannot write the env's files: {e}") from None
    except BaseException:
        shutil.rmtree(env_dir, ignore_errors=True)
        raise
    return env_dir
