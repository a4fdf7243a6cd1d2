"""Secrets read from files (issue 13, docs/security.md): the Redis password, WeChat Pay's
merchant key and APIv3 key, a client TLS key.

A secret file must not be readable by group or others: `read_secret` refuses one that is
with a ConfigError naming the setting, the path and the mode (`stockhold serve` prints it as
its one line and exits 2). The mode is read from the open file (fstat), so what is checked
is what is read. The secret itself is never part of a message.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from stockhold.settings import ConfigError, Settings

# Bits that must be clear on a secret file: any access by group or others.
_OPEN_BITS = stat.S_IRWXG | stat.S_IRWXO


def read_secret(path: str | os.PathLike[str], field: str) -> bytes:
    """The bytes of secret file `path`, which setting `field` names.

    ConfigError when it cannot be read, is not a regular file, or is readable (or writable)
    by group or others: the message gives the path and the mode, never the content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(field, str(path), f"a readable secret file ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(field, str(path), "a regular file")
        if st.st_mode & _OPEN_BITS:
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigError(
                field,
                str(path),
                f"a file only its owner can read (mode is {mode:04o}; chmod 600 {path})",
            )
        return f.read()


def read_secret_text(path: str | os.PathLike[str], field: str) -> str:
    """`read_secret` as text (UTF-8), without the trailing newline an editor leaves."""
    data = read_secret(path, field)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(field, str(path), "a UTF-8 text file") from None
    return text.rstrip("\r\n")


def redis_password(settings: Settings) -> str | None:
    """The Redis password of `redis_password_file` (checked as a secret file), else None
    (then the URL's own password, if any, is used)."""
    if not settings.redis_password_file:
        return None
    password = read_secret_text(settings.redis_password_file, "redis_password_file")
    if not password:
        raise ConfigError("redis_password_file", settings.redis_password_file, "a non-empty file")
    return password


def redis_kwargs(settings: Settings) -> dict[str, Any]:
    """What every redis-py client of a deployment gets besides its URL: the password of
    `redis_password_file` (when set; the URL's username, if any, is kept) and no CLIENT
    SETINFO (nothing to allow in the Redis ACL of docs/security.md). A connection made from
    a client's `connection_kwargs` (the deliverer's hint listener) inherits them, and the
    URL's TLS options."""
    kwargs: dict[str, Any] = {"driver_info": None}
    password = redis_password(settings)
    if password is not None:
        kwargs["password"] = password
    return kwargs


def check_secret_files(settings: Settings) -> None:
    """Read every secret file the Redis settings name (the password file, a client TLS key
    in the URL): ConfigError, before anything starts, for one serve could not use."""
    redis_password(settings)
    keyfile = redis_url_keyfile(settings.redis_url)
    if keyfile:
        read_secret(keyfile, "redis_url")


def redis_url_keyfile(url: str | None) -> str:
    """The `ssl_keyfile` query parameter of a Redis URL ("" when none)."""
    from urllib.parse import parse_qs, urlsplit

    if not url:
        return ""
    values = parse_qs(urlsplit(url).query).get("ssl_keyfile", [])
    return values[-1] if values else ""


__all__ = [
    "check_secret_files",
    "read_secret",
    "read_secret_text",
    "redis_kwargs",
    "redis_password",
    "redis_url_keyfile",
]
