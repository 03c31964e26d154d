"""PII scrubbing: e-mail addresses, phone numbers, IP addresses, credit-card numbers (Luhn-checked)
and secret-looking keys and tokens become typed placeholders such as ``<EMAIL>``, counted by type.

:func:`find_pii` is the same detector without replacing; the validation gate uses it to prove that
nothing is left after scrubbing.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

from lmforge.config.curation import PiiConfig

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>",
                "credit_card": "<CREDIT_CARD>", "secret": "<SECRET>"}

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
# Separators are required, so version numbers, years and plain integers are not phones.
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
                    r"(?![\w.-]*\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_SECRET = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # API keys in the sk- style
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON web tokens
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:\b(?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key)\b[\"']?\s*[:=]\s*[\"']?)"
    r"(?=[A-Za-z0-9_\-/+=]*\d)[A-Za-z0-9_\-/+=]{16,}", re.S)


def _luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    # Issuer prefixes (Visa, Mastercard, Amex, Discover, JCB, Diners) cut chance Luhn passes.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits)


def _is_public_ip(match: str) -> bool:
    try:
        return ipaddress.ip_address(match).is_global
    except ValueError:
        return False


def _is_ip(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
        return True
    except ValueError:
        return False


def _is_phone(match: str) -> bool:
    return 7 <= sum(c.isdigit() for c in match) <= 15


def _detectors(cfg: PiiConfig) -> list[tuple[str, re.Pattern, Callable[[str], bool] | None]]:
    ip_check = _is_public_ip if cfg.keep_private_ips else _is_ip
    table: dict[str, list[tuple[re.Pattern, Callable[[str], bool] | None]]] = {
        # Secrets first: a token can contain digit runs that look like phones or cards.
        "secret": [(_SECRET, None)],
        "email": [(_EMAIL, None)],
        "credit_card": [(_CARD, _is_card)],
        "ip_address": [(_IPV4, ip_check), (_IPV6, ip_check)],
        "phone": [(_PHONE, _is_phone)],
    }
    return [(kind, pattern, check) for kind in table if kind in cfg.kinds for pattern, check in table[kind]]


def _scan(text: str, detectors: Iterable) -> Iterable[tuple[str, re.Match]]:
    for kind, pattern, check in detectors:
        for match in pattern.finditer(text):
            if check is None or check(match.group(0)):
                yield kind, match


def find_pii(text: str, cfg: PiiConfig | None = None) -> list[tuple[str, str]]:
    """(kind, matched text) of every PII match left in ``text``."""
    return [(kind, m.group(0)) for kind, m in _scan(text, _detectors(cfg or PiiConfig()))]


class ScrubPii:
    name = "pii"

    def __init__(self, cfg: PiiConfig) -> None:
        self.detectors = _detectors(cfg)
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        found = 0
        for kind, pattern, check in self.detectors:
            text, n = _replace(text, kind, pattern, check)
            if n:
                self.counts[kind] += n
                found += n
        if found:
            doc["text"] = text
            doc["meta"]["pii_replaced"] = found
        return None


def _replace(text: str, kind: str, pattern: re.Pattern, check) -> tuple[str, int]:
    count = 0

    def sub(match: re.Match) -> str:
        nonlocal count
        if check is not None and not check(match.group(0)):
            return match.group(0)
        count += 1
        return PLACEHOLDERS[kind]

    return pattern.sub(sub, text), count
