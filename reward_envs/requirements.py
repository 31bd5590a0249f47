"""What an env may ask its venv build to install, read the one way every path uses.

Requirements reach the builder through a manifest's ``requirements`` list, its ``lock`` file
and the files those include, whether the env comes from a directory, a run config or an API
registration. All of them are read here, line by line, with the pip requirements-file rules
(``\\`` continuations, ``#`` comments after whitespace, one requirement or option per line)
and ``packaging`` for each requirement. What is read is what gets installed: the builder hands
uv a file it writes from the result, never the env's own files.

Allowed: a requirement by name (extras, version specifiers, environment markers) with
``--hash`` options. Refused, with the file, the line and what to change: every other option
(``--index-url``, ``--extra-index-url``, ``--find-links``, ``--trusted-host``, ``--no-index``,
``-e``, ``-r``, ``-c``, ...), URL, VCS and local-path requirements, and ``${VAR}``
references. The exceptions are the server operator's, in a ``RequirementPolicy``: index URLs
and find-links directories it lists, and includes of files inside the env's own directory.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import Field, field_validator

from common.config import StrictModel

DEFAULT_INDEX = "https://pypi.org/simple"
MAX_INCLUDE_DEPTH = 8
HASH = re.compile(r"^(sha256|sha384|sha512):[0-9a-fA-F]+$")
COMMENT = re.compile(r"(^|\s+)#.*$")
URL_OR_VCS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^(git|hg|svn|bzr)\+|\s@\s|^[^\s@;]+@\S")
LOCAL_PATH = re.compile(r"[/\\]|^[.~]|\.(whl|zip|tar|tar\.gz|tgz|tar\.bz2|tar\.xz|egg)$", re.I)
INDEX_OPTIONS = {"-i", "--index-url", "--extra-index-url", "--index", "--default-index"}
FIND_LINKS = {"-f", "--find-links"}
INCLUDES = {"-r": False, "--requirement": False, "-c": True, "--constraint": True}
WHY = {
    "--no-index": "the server decides where packages come from",
    "--trusted-host": "it turns off TLS checks for a host",
    "--allow-insecure-host": "it turns off TLS checks for a host",
    "-e": "editable installs build from a path or a repository, not a released package",
    "--editable": "editable installs build from a path or a repository, not a released package",
}


class RequirementPolicy(StrictModel):
    """Where env venv builds get packages from, and what an env's requirement files may say
    beyond plain requirements. Set by whoever runs the builds; the default allows nothing."""

    index_url: str = DEFAULT_INDEX
    """The package index every build installs from (uv ``--default-index``). uv's and pip's
    own settings (``UV_INDEX_URL``, ``PIP_INDEX_URL``, ``uv.toml``, ...) are ignored: set a
    mirror here."""
    allow_index_urls: list[str] = Field(default_factory=list)
    """Index URLs an env's requirement files may name with ``--index-url``/``-i`` (replacing
    ``index_url``) or ``--extra-index-url``, compared exactly (trailing ``/`` aside)."""
    allow_find_links: list[Path] = Field(default_factory=list)
    """Absolute directories an env's requirement files may name with ``--find-links``/``-f``
    (the directory or one inside it)."""
    allow_includes: bool = False
    """Let an env's requirement files include others (``-r``/``-c``) from the env's own
    directory; included files are read with the same rules."""

    @field_validator("index_url", "allow_index_urls")
    @classmethod
    def _urls(cls, v: str | list[str]) -> str | list[str]:
        for url in [v] if isinstance(v, str) else v:
            if not re.match(r"^https?://[^\s/]+", url):
                raise ValueError(f"{url!r} is not an http(s) URL of a package index")
        return v

    @field_validator("allow_find_links")
    @classmethod
    def _dirs(cls, v: list[Path]) -> list[Path]:
        bad = [str(p) for p in v if not p.is_absolute()]
        if bad:
            raise ValueError(f"{', '.join(bad)}: give absolute directories")
        return v


class RequirementError(ValueError):
    """A requirement or option that is not allowed; the message says where and what to do."""


@dataclass
class Requirements:
    """What an env's build installs, as read from all its sources."""

    requirements: list[str] = field(default_factory=list)
    """Normalized requirement lines (``str(packaging Requirement)`` and its ``--hash``es)."""
    constraints: list[str] = field(default_factory=list)
    """Lines from files included with ``-c`` (allowed only by ``allow_includes``)."""
    index_url: str | None = None
    """An allowed ``--index-url`` from a file: replaces the policy's ``index_url``."""
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Every file read, relative to the env directory."""

    def names(self) -> list[str]:
        """The requirement lines without their hashes (for messages)."""
        return [r.split(" --hash")[0] for r in self.requirements]


def parse_requirement(text: str, where: str) -> str:
    """One requirement (``name[extras] specifiers ; markers`` plus ``--hash`` options) as the
    normalized line the builder installs; ``RequirementError`` naming ``where`` otherwise."""
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise RequirementError(f"{where}: one requirement per entry, without line breaks")
    if not text:
        raise RequirementError(f"{where}: empty requirement")
    if "${" in text:
        raise _refused(where, text, "it references an environment variable", "write the value")
    if text.startswith("-"):
        _option_refused(where, shlex_split(text, where)[0], text)
    tokens = text.split()
    cut = next((i for i, t in enumerate(tokens) if t.startswith("-")), len(tokens))
    spec, options = " ".join(tokens[:cut]), tokens[cut:]
    if URL_OR_VCS.search(spec):
        raise _refused(
            where,
            spec,
            "a URL or VCS requirement installs from outside the server's package index",
            "name a released package and version instead (e.g. 'pint==0.24.4')",
        )
    if LOCAL_PATH.search(spec.split(";")[0].strip()):
        raise _refused(
            where,
            spec,
            "a local path or archive installs from outside the server's package index",
            "name a released package and version instead (e.g. 'pint==0.24.4')",
        )
    try:
        req = Requirement(spec)
    except InvalidRequirement as e:
        raise RequirementError(
            f"{where}: {spec!r} is not a requirement ({e}); write e.g. 'pint==0.24.4'"
        ) from None
    if req.url:
        raise _refused(where, spec, "a direct reference installs from outside the index", "")
    hashes = []
    i = 0
    while i < len(options):
        name, value, i = _take_option(options, i, where, text)
        if name != "--hash":
            _option_refused(where, name, text, after_requirement=True)
        if not value or not HASH.match(value):
            raise RequirementError(
                f"{where}: --hash {value!r} in {text!r} is not a hash; write "
                "--hash=sha256:<hex digest> (sha256, sha384 or sha512)"
            )
        hashes.append(f"--hash={value}")
    return " ".join([str(req), *hashes])


def read_env_requirements(
    env_dir: Path,
    requirements: list[str],
    lock: str | None,
    policy: RequirementPolicy | None = None,
) -> Requirements:
    """Everything an env's build would install: its manifest's ``requirements`` list and, when
    it names one, its ``lock`` file (installed instead of the list) with the files it
    includes. Both are read and checked, so nothing unread reaches uv."""
    policy = policy or RequirementPolicy()
    listed = [parse_requirement(r, f"requirements[{i}]") for i, r in enumerate(requirements)]
    if lock is None:
        return Requirements(requirements=listed)
    out = Requirements()
    _read_file(Path(env_dir).resolve(), lock, "the manifest's lock", policy, out, [], False)
    return out


def _read_file(
    env_dir: Path,
    name: str,
    named_by: str,
    policy: RequirementPolicy,
    out: Requirements,
    stack: list[Path],
    constraint: bool,
) -> None:
    base = stack[-1].parent if stack else env_dir
    try:
        path = (base / name).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise RequirementError(f"{named_by}: {name!r} is not a usable file name ({e})") from None
    if not path.is_relative_to(env_dir):
        raise RequirementError(
            f"{named_by} names {name!r}, which is outside the env directory; keep requirement "
            "files inside it"
        )
    rel = str(path.relative_to(env_dir))
    if path in stack:
        chain = " -> ".join(str(p.relative_to(env_dir)) for p in [*stack, path])
        raise RequirementError(f"{named_by}: includes form a cycle ({chain}); remove one")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise RequirementError(
            f"{named_by}: includes nested more than {MAX_INCLUDE_DEPTH} deep; flatten them"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequirementError(f"{named_by}: cannot read {rel} ({e})") from None
    out.files.append(rel)
    stack = [*stack, path]
    for number, line in _logical_lines(text):
        where = f"{rel}:{number}"
        if not line.startswith("-"):
            (out.constraints if constraint else out.requirements).append(
                parse_requirement(line, where)
            )
            continue
        if "${" in line:
            raise _refused(where, line, "it references an environment variable", "write it out")
        tokens = shlex_split(line, where)
        i = 0
        while i < len(tokens):
            opt, value, i = _take_option(tokens, i, where, line)
            if opt in INCLUDES:
                if not policy.allow_includes:
                    raise _refused(
                        where,
                        line,
                        "this server does not allow requirement files to include others",
                        "put the requirements in this file (the operator can set allow_includes)",
                    )
                if not value or "://" in value:
                    raise RequirementError(f"{where}: {opt} needs a file name in the env dir")
                _read_file(env_dir, value, where, policy, out, stack, constraint or INCLUDES[opt])
            elif opt in INDEX_OPTIONS and _allowed_index(value, policy):
                assert value is not None
                if opt in ("-i", "--index-url", "--default-index"):
                    out.index_url = value
                else:
                    out.extra_index_urls.append(value)
            elif opt in FIND_LINKS and _allowed_links(value, path.parent, policy):
                assert value is not None
                out.find_links.append(str((path.parent / value).resolve()))
            else:
                _option_refused(where, opt, line)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with continuations joined and comments removed, as pip."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    first = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.endswith("\\") and not COMMENT.search(raw):
            if not parts:
                first = number
            parts.append(raw[:-1])
            continue
        if parts:
            raw, number = "".join(parts) + " " + raw, first
            parts = []
        line = COMMENT.sub("", raw).strip()
        if line:
            out.append((number, line))
    if parts:  # a continuation on the last line
        line = COMMENT.sub("", "".join(parts)).strip()
        if line:
            out.append((first, line))
    return out


def shlex_split(line: str, where: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as e:
        raise RequirementError(f"{where}: cannot read {line!r} ({e})") from None


def _take_option(tokens: list[str], i: int, where: str, line: str) -> tuple[str, str | None, int]:
    """The option at ``tokens[i]`` as (lower-case name, value, next index): ``--name=value``,
    ``--name value``, ``-Xvalue`` and ``-X value`` spellings alike."""
    token = tokens[i]
    if not token.startswith("-"):
        raise RequirementError(
            f"{where}: unexpected {token!r} in {line!r}; put each requirement on its own line"
        )
    if token.startswith("--"):
        name, eq, value = token.partition("=")
        name = name.lower()
        if eq:
            return name, value, i + 1
    else:
        name, rest = token[:2].lower(), token[2:]
        if rest:
            return name, rest.removeprefix("="), i + 1
    takes_value = name not in ("--no-index", "--pre", "--require-hashes", "--prefer-binary")
    if takes_value and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
        return name, tokens[i + 1], i + 2
    return name, None, i + 1


def _allowed_index(value: str | None, policy: RequirementPolicy) -> bool:
    allowed = {u.rstrip("/") for u in policy.allow_index_urls}
    return value is not None and value.rstrip("/") in allowed


def _allowed_links(value: str | None, here: Path, policy: RequirementPolicy) -> bool:
    if value is None or "://" in value:
        return False
    target = (here / value).resolve()
    return any(target.is_relative_to(d.resolve()) for d in policy.allow_find_links)


def _refused(where: str, text: str, why: str, fix: str) -> RequirementError:
    return RequirementError(f"{where}: {text!r} is refused: {why}" + (f"; {fix}" if fix else ""))


def _option_refused(where: str, opt: str, line: str, after_requirement: bool = False) -> None:
    """Raise the refusal of option ``opt``: why, and what to do instead (which operator setting
    could allow it, when one could)."""
    opt = opt.split("=")[0].lower()
    short = opt if opt.startswith("--") else opt[:2]
    setting = None
    if short in INDEX_OPTIONS or short == "--no-index":
        why = "builds install only from the package index the server's operator configured"
        setting, fix = (
            "allow_index_urls",
            "the operator can allow an index URL with allow_index_urls",
        )
    elif short in FIND_LINKS:
        why = "builds install only from the package index the server's operator configured"
        setting, fix = (
            "allow_find_links",
            "the operator can allow a directory with allow_find_links",
        )
    elif short in INCLUDES:
        why = "an include of another file"
        setting, fix = "allow_includes", "the operator can allow includes with allow_includes"
    else:
        why = WHY.get(short, f"pip option {opt} is not allowed in env requirements")
        fix = "only requirements (name, extras, version, markers) and --hash are allowed"
    if short == "--no-index":
        setting, fix = None, "builds never skip the configured index"
    in_list = where.startswith("requirements[")
    if in_list or after_requirement:
        there = "in the manifest's requirements list" if in_list else "after a requirement"
        fix = f"only a requirement and its --hash options belong {there}"
        if setting:
            fix += (
                f"; a line of its own in the lock file may hold it if the operator sets {setting}"
            )
    elif short in INCLUDES:
        fix = f"put the requirements in this file ({fix})"
    else:
        fix = f"remove it ({fix})" if setting else f"remove it: {fix}"
    raise _refused(where, line, why, fix)
