"""URL normal form for crawl dedup (the same page is one URL however a link spelled it), and the
redaction of credentials from every URL the collect stage records.

A URL may carry a user name and password (``https://user:secret@host/``). The fetcher never sends
them (it refuses such URLs) and nothing that is written (manifest, reports, skip examples, errors)
may hold them: :func:`redact_urls` replaces the user-info part of every URL in a string or a JSON-like
value with ``***``.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

_TRACKING = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid", "_ga", "yclid", "msclkid")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# scheme://USERINFO@ : the user-info runs up to the last '@' before the path, query or fragment
# (urlsplit's rule, so an unescaped '@' inside a password is redacted with the rest of it).
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#]*@")
REDACTED = "***"


def normalize_url(url: str, base: str | None = None) -> str | None:
    """Absolute http(s) URL in normal form (lower-case scheme and host, no default port, no
    fragment, no dot segments, no tracking parameters), or None for other schemes."""
    try:
        parts = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        port = parts.port
    except ValueError:  # a malformed port or IPv6 literal in a link
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path or "/"
    normal = posixpath.normpath(path)
    if path.endswith("/") and normal != "/":
        normal += "/"
    path = quote(normal, safe="/:@!$&'()*+,;=-._~%")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not k.lower().startswith(_TRACKING)])
    return urlunsplit((scheme, netloc, path, query, ""))


def site_of(url: str) -> str:
    """The host a same-site rule compares (``www.`` does not make another site)."""
    host = (urlsplit(url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def has_credentials(url: str) -> bool:
    """True when ``url`` names a user or a password."""
    return _USERINFO.match(url.strip()) is not None


def redact_url(url: str) -> str:
    """``url`` with its user-info (user name and password) replaced by ``***``."""
    return _USERINFO.sub(rf"\1{REDACTED}@", url)


def redact_urls(value: Any) -> Any:
    """``value`` (a string, or lists, tuples and dicts of them) with every URL's user-info redacted."""
    if isinstance(value, str):
        return redact_url(value) if "@" in value else value
    if isinstance(value, dict):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_urls(item) for item in value)
    return value
