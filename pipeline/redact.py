"""Secrets never leave the process: credentials are masked in everything a run writes or prints.

A user can hand a run credentials in four places: a URI's userinfo (``s3://key:secret@bucket``,
``https://user:password@host/m.jsonl``), a presigned URL's query (``X-Amz-Signature``,
``X-Amz-Credential``, ``X-Amz-Security-Token``, ``sig``, ``token``, ...), a credential-named key of
a mapping (``sink.storage_options.secret``) and the environment. The first three are masked here:

- :func:`redact_text` in any text: log lines, exception messages, reasons;
- :func:`redact` in a JSON-able record (errors, markers, sample metadata, summaries): every string;
- :func:`redact_config` in a configuration tree: every string, and the value of every
  credential-named key.

The environment reaches no output: workers get only named, non-secret variables
(``pipeline.run.forwarded_env``). :func:`guard_streams` masks what the process prints, the last
line of defence for log lines and tracebacks. Masking errs on the side of hiding: a harmless
value under a credential-like name is masked too.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

MASK = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "signature", "auth")
SECRET_NAMES = frozenset({"sig", "pwd"})
USERINFO = re.compile(r"(?<=://)(?:[^/\s@:'\"]*:[^\s@'\"]*|[^/\s@:'\"]+)@"  # after a scheme
                      r"|(?<=[\s\"'(])[^\s\"'/@:]+:[^\s\"'/@]+@(?=[\w.-])")  # "user:secret@host", a URI cut by an error message
NAME_VALUE = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*)=([^&#\s'\"]*)")
QUOTED_PAIR = re.compile(r"""(['"])([^'"]+)\1(\s*[:=]\s*)(['"])([^'"]*)\4""")
AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def is_secret_name(name: str) -> bool:
    """Whether a key or parameter name marks a credential (``secret``, ``X-Amz-Signature``, ``sig``)."""
    lower = name.lower()
    return lower in SECRET_NAMES or any(word in lower for word in SECRET_WORDS)


def redact_text(text: str) -> str:
    """``text`` with URI userinfo, credential-named ``name=value`` pairs (query parameters
    included), quoted credential-named pairs and Authorization values masked."""
    text = USERINFO.sub(MASK + "@", text)
    text = NAME_VALUE.sub(lambda m: f"{m[1]}={MASK}" if is_secret_name(m[1]) and m[2] else m[0], text)
    text = QUOTED_PAIR.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{MASK}{m[4]}"
                           if is_secret_name(m[2]) and m[5] else m[0], text)
    return AUTH_HEADER.sub(lambda m: f"{m[1]} {MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-able record with every string passed through :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def redact_config(value: Any) -> Any:
    """A copy of a configuration tree with credential-named keys' values masked and every string
    redacted (a URI with userinfo, an option holding a presigned URL)."""
    if isinstance(value, dict):
        return {key: MASK if is_secret_name(str(key)) and item else redact_config(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_config(item) for item in value]
    return redact(value)


class RedactingStream:
    """A text stream that masks secrets in what is written through it; all else is the stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Mask secrets in everything this process prints to stdout and stderr from now on (log
    handlers created later, ``print``, tracebacks, Ray's forwarded worker output)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
