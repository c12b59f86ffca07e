"""Pattern PII: replace e-mail addresses, phone numbers, IP addresses, credit-card
numbers and secrets (API keys, tokens, private keys, passwords in assignments)
with typed placeholders such as ``<EMAIL>``.

Hand-written on purpose. Microsoft Presidio would need spaCy models downloaded
from a model hub at run time; slmforge is offline-first and only needs PII that
a pattern can find, not names or addresses that need NER.

Every pattern is written to leave code and technical prose alone: version
numbers (3.11.7), dates (2024-01-15), times, decimals, ranges (1000-2000),
slices (``a[::2]``), ``std::vector``, ``@decorators`` and plain integers are not
touched. The price is recall: an e-mail without a dotted domain, a phone number
written as one plain run of digits without ``+``, a card number starting with
0, 1, 7, 8 or 9 (no major issuer), IPv6 shorthand such as ``::1`` (it looks like
a slice), or an unquoted password of letters only (``password: correcthorse``,
which reads like ``password: Optional`` in a docstring) is kept. Every valid
IPv4 address is replaced, 127.0.0.1 and documentation ranges included.

This module is a hot path (it runs over every document), so every pattern is
compiled once at import and each pass is skipped when a cheap substring test
shows it cannot match.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterable
from types import MappingProxyType

from slmforge.errors import ConfigError

PII_TYPES = ("email", "phone", "ip_address", "credit_card", "secret")
PLACEHOLDERS = MappingProxyType(
    {
        "email": "<EMAIL>",
        "phone": "<PHONE>",
        "ip_address": "<IP_ADDRESS>",
        "credit_card": "<CREDIT_CARD>",
        "secret": "<SECRET>",
    }
)
# Secrets first so a key is not half-eaten by the phone or card pattern; cards
# and IPs before phones so their digits are gone when phones are looked for.
_ORDER = ("secret", "email", "credit_card", "ip_address", "phone")

# --------------------------------------------------------------------------- secret

# The body may not contain "-----", so a BEGIN without END costs one scan to the
# next marker, not one to the end of the document.
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[^-]*+(?:-(?!----)[^-]*+)*+-----END [A-Z0-9 ]*PRIVATE KEY-----"
)
# Token formats with a recognisable prefix, one alternation so they cost one pass.
_KEYED_SECRET = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub personal/OAuth/user/server/refresh token
    r"|github_pat_[A-Za-z0-9_]{22,}"  # GitHub fine-grained token
    r"|(?:sk|pk|rk)_live_[A-Za-z0-9]{16,}"  # Stripe live keys
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style keys (sk-..., sk-proj-...)
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWT (signature may be empty)
    r")(?![A-Za-z0-9_-])"
)
# Quick test before running _KEYED_SECRET: every format contains one of these.
_KEYED_SECRET_HINT = re.compile(r"AKIA|ASIA|gh[pousr]_|github_pat_|_live_|sk-|xox|AIza|eyJ")
# `api_key = "..."`, `password: ...`, `"token": "..."`, `SECRET_KEY=...`: the key
# (with any prefix such as `client_`, `aws_`, `x-`) stays, only the value goes.
# Matched against the lowercased text: five times faster than re.IGNORECASE.
_ASSIGNED_SECRET = re.compile(
    r"(?<![a-z0-9])"
    r"(?:api[_-]?key|access[_-]?key|secret(?:[_-]?(?:access[_-]?)?key)?|private[_-]?key"
    r"|password|passwd|pwd|token|credentials?)"
    r"(?![a-z0-9_-])[\"']?[ \t]*[:=][ \t]*"
    r"(?:(?P<quote>[\"'])(?P<quoted>[^\s\"'<>]{8,})(?P=quote)"
    # Unquoted: possessive so `token=get_token()` cannot shrink to dodge the `(` check.
    r"|(?P<bare>[^\s\"'`<>()\[\]{},;&]{8,}+)(?![(\[]))"
)
_ASSIGNED_SECRET_HINT = ("key", "secret", "pass", "pwd", "token", "credential")
# An unquoted value made of letters, underscores and dots only is code or prose
# (`password=password`, `token: self.token`, `Password: Optional`), not a secret.
_IDENTIFIER_LIKE = re.compile(r"[A-Za-z_][A-Za-z_.]*")

# --------------------------------------------------------------------------- email

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9_-]|\()"  # `a@b.transpose()` is matrix multiplication
)

# --------------------------------------------------------------------------- credit card

# Written to start with a plain \d (the left-boundary check comes after the first
# digit) so the regex engine can skip ahead to digits: four times faster.
_CREDIT_CARD = re.compile(
    r"\d(?<![\w.\-]\d)(?:"
    r"\d{12,18}"
    r"|\d{3}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{3})?"  # 4-4-4-4(-3)
    r"|\d{3}(?P<sep2>[ -])\d{6}(?P=sep2)\d{4,5}"  # Amex 4-6-5, Diners 4-6-4
    r")(?!\w|[.\-]\d)"
)

# --------------------------------------------------------------------------- IP address

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Cheap tests that must succeed before the full patterns run.
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::[0-9A-Fa-f]")
# A leading lookahead on the first character lets the engine skip ahead (2x faster).
_IPV4 = re.compile(rf"(?=\d)(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# Candidates only; ipaddress decides. Needs two colons, may end in dotted IPv4.
_IPV6 = re.compile(
    r"(?=[0-9A-Fa-f:])(?<![\w:.])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}"
    r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]+")

# --------------------------------------------------------------------------- phone

_PHONE = re.compile(
    # Nothing glued on either side and no neighbouring number: `12:00.1234567` is a
    # time and `192 384 768 1536` a list of numbers, not phones.
    r"(?=[+(\d])(?<![\w+.\-/])(?<!\d[:. \-/])(?:"
    # International: +CC, optional (0) or (area), then digit groups.
    r"\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,6}){1,6}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567.
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}(?P<nanp>[ .-])\d{3}(?P=nanp)\d{4}"
    # National with trunk 0: (030) 1234567, 020 7946 0958, 01 23 45 67 89, 030 12345678.
    # Two short groups (0800-1200) are too much like a range to count; 00 is the
    # international prefix and 00.. runs are more often hex or zero padding.
    r"|\(0[1-9]\d{0,3}\)[ ]?\d{3,8}(?:[ .-]\d{2,4}){0,3}"
    r"|0[1-9]\d{0,3}(?:[ -]\d{5,8}|[ .-]\d{2,4}(?:[ .-]\d{2,4}){1,3})"
    r")(?!\w|[.\-/: ]\d)"
)
# Signed numbers, not phones: +3.14, +35236450.6, and +1234567 without separators
# (an E.164 number written in one run has at least 10 digits).
_SIGNED_NUMBER = re.compile(r"\+\d+(?:\.\d+)?")
# Dates (2024-01-15, 01.02.2024, 009-03-04) and dotted numbers shaped like IPs or
# versions (016.016.016, 001.000.008.016) are not phones either.
_DATE = re.compile(r"\d{1,4}([-./ ])\d{1,2}\1\d{1,4}")
_DOTTED_SHORT = re.compile(r"\d{1,3}(?:\.\d{1,3}){2,3}")
_NOT_DIGIT = re.compile(r"\D")
_ANY_DIGIT = re.compile(r"\d")


def luhn_valid(digits: str) -> bool:
    """Whether a card number passes the Luhn checksum.

    Args:
        digits: The number; spaces and dashes are ignored.

    Returns:
        True if it has at least two digits, no other characters, and a valid
        check digit.
    """
    digits = digits.replace(" ", "").replace("-", "")
    if len(digits) < 2 or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _add(counts: Counter[str], name: str, n: int) -> None:
    if n:  # keep types that were not found out of the counter
        counts[name] += n


def _scrub_secret(text: str, counts: Counter[str]) -> str:
    placeholder = PLACEHOLDERS["secret"]
    if "PRIVATE KEY-----" in text:
        text, n = _PEM_PRIVATE_KEY.subn(placeholder, text)
        _add(counts, "secret", n)
    if _KEYED_SECRET_HINT.search(text):
        text, n = _KEYED_SECRET.subn(placeholder, text)
        _add(counts, "secret", n)
    lowered = text.lower()
    if not any(hint in lowered for hint in _ASSIGNED_SECRET_HINT):
        return text
    if len(lowered) != len(text):
        # A few characters lowercase to two (U+0130); spans would not line up.
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    pieces, last = [], 0
    for m in _ASSIGNED_SECRET.finditer(lowered):
        group = "quoted" if m["quoted"] is not None else "bare"
        start, end = m.span(group)
        value = text[start:end]
        if value[0] in "${%":  # ${ENV_VAR}, {{ template }}, %(name)s
            continue
        if group == "bare" and _IDENTIFIER_LIKE.fullmatch(value):
            continue
        pieces += (text[last:start], placeholder)
        last = end
    if pieces:
        counts["secret"] += len(pieces) // 2
        text = "".join(pieces) + text[last:]
    return text


def _scrub_email(text: str, counts: Counter[str]) -> str:
    if "@" not in text:
        return text
    text, n = _EMAIL.subn(PLACEHOLDERS["email"], text)
    _add(counts, "email", n)
    return text


def _scrub_credit_card(text: str, counts: Counter[str]) -> str:
    def card(m: re.Match[str]) -> str:
        digits = _NOT_DIGIT.sub("", m[0])
        # Issuer ranges start with 2-6 (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4,
        # Discover/UnionPay/Maestro 6); this halves false hits on long IDs.
        if digits[0] in "23456" and luhn_valid(digits):
            counts["credit_card"] += 1
            return PLACEHOLDERS["credit_card"]
        return m[0]

    return _CREDIT_CARD.sub(card, text)


def _scrub_ip_address(text: str, counts: Counter[str]) -> str:
    placeholder = PLACEHOLDERS["ip_address"]
    if _IPV6_HINT.search(text):

        def ipv6(m: re.Match[str]) -> str:
            candidate = m[0]
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                return m[0]
            groups = _HEX_GROUP.findall(candidate)
            # `::`, `::1`, `a[1::2]` are valid addresses but far more often code.
            if len(groups) < 3 and max((len(g) for g in groups), default=0) < 3:
                return m[0]
            counts["ip_address"] += 1
            return placeholder

        text = _IPV6.sub(ipv6, text)
    if _IPV4_HINT.search(text):
        text, n = _IPV4.subn(placeholder, text)
        _add(counts, "ip_address", n)
    return text


def _scrub_phone(text: str, counts: Counter[str]) -> str:
    def phone(m: re.Match[str]) -> str:
        candidate = m[0]
        n_digits = len(_NOT_DIGIT.sub("", candidate))
        if (
            not 7 <= n_digits <= 15
            or _DATE.fullmatch(candidate)
            or _DOTTED_SHORT.fullmatch(candidate)
            or (n_digits < 10 or "." in candidate) and _SIGNED_NUMBER.fullmatch(candidate)
        ):
            return candidate
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    return _PHONE.sub(phone, text)


_SCRUBBERS = {
    "secret": _scrub_secret,
    "email": _scrub_email,
    "credit_card": _scrub_credit_card,
    "ip_address": _scrub_ip_address,
    "phone": _scrub_phone,
}
_NEEDS_DIGITS = frozenset({"credit_card", "ip_address", "phone"})


def scrub_pii(text: str, types: Iterable[str] = PII_TYPES) -> tuple[str, Counter[str]]:
    """Replace personal data and secrets with typed placeholders.

    Passes run in a fixed order whatever the order of ``types``: secret, email,
    credit_card, ip_address, phone. Placeholders match no pattern, so scrubbing
    twice changes nothing more.

    Args:
        text: One document.
        types: Which kinds to replace, a subset of ``PII_TYPES``.

    Returns:
        The scrubbed text and how many replacements were made per type (types
        with none are absent from the counter).

    Raises:
        ConfigError: A name in ``types`` is not one of ``PII_TYPES``.
    """
    wanted = set(types)
    unknown = wanted.difference(PII_TYPES)
    if unknown:
        raise ConfigError(
            f"Unknown PII type(s) {sorted(unknown)} in data.pii.types; choose from {list(PII_TYPES)}."
        )
    counts: Counter[str] = Counter()
    has_digits = _ANY_DIGIT.search(text) is not None
    for name in _ORDER:
        if name in wanted and (has_digits or name not in _NEEDS_DIGITS):
            text = _SCRUBBERS[name](text, counts)
    return text, counts
