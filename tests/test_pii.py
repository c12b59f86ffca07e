"""Pattern PII scrubbing: table-driven positives and negatives per type, counts,
idempotence, and code/docs text that must come back byte-identical."""

from __future__ import annotations

import json
import os.path
import textwrap

import pytest

from slmforge.data.pii import PII_TYPES, PLACEHOLDERS, luhn_valid, scrub_pii
from slmforge.errors import ConfigError

# (text containing exactly one item, the item itself) per type.
POSITIVES = {
    "email": [
        "Contact jane.doe@example.com for details.",
        "Write to john+newsletter@mail.example.co.uk today.",
        "first_last-99@sub.domain.org",
        "<bob@python.org>",
        "mailto:info@egenix.com",
        "UPPER.Case@Example.COM is fine",
    ],
    "phone": [
        "Call +1 (555) 123-4567 now.",
        "Call +1-555-123-4567.",
        "London: +44 20 7946 0958",
        "London: +44 (0)20 7946 0958",
        "Berlin +49 30 12345678",
        "Paris +33 1 23 45 67 89",
        "E.164: +14155552671",
        "Mumbai +91-98765-43210",
        "US (555) 123-4567.",
        "US 555-123-4567",
        "US 555.123.4567",
        "US 555 123 4567",
        "UK 020 7946 0958",
        "FR 01 23 45 67 89",
        "DE (030) 1234567",
        "DE 030 12345678",
        "tel:+31-641044153",
    ],
    "ip_address": [
        "Server at 192.168.1.1 is down.",
        "bind to 10.0.0.255:8080",
        "host 8.8.8.8.",
        "addr = '127.0.0.1'",
        "range 255.255.255.255",
        "v6 2001:db8::1 here",
        "full 2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "link-local fe80::1ff:fe23:4567:890a",
        "mapped ::ffff:192.0.2.128",
        "url http://[2001:db8::7]:8080/",
    ],
    "credit_card": [
        "Visa 4111 1111 1111 1111 expires",
        "Visa 4111-1111-1111-1111",
        "Visa 4111111111111111",
        "Mastercard 5555 5555 5555 4444",
        "Amex 378282246310005",
        "Amex 3782 822463 10005",
        "Discover 6011111111111117",
        "Diners 3056 930902 5904",
        "Visa-13 4222222222222",
    ],
    "secret": [
        "aws AKIAIOSFODNN7EXAMPLE in config",
        "session ASIAY34FZKBOKMUTVV7A",
        "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
        "OPENAI sk-abcdefghijklmnopqrstuvwx1234",
        "sk-proj-AbC123_def-456GhI789jkl",
        "slack xoxb-123456789012-abcdefghijkl",
        "google AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "stripe pk_live_TYooMQauvdEDq54NiTphI7jx",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        "eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx\nabcdef==\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,AB12\n\n"
        "MIIE+/=\n-----END ENCRYPTED PRIVATE KEY-----",
        'api_key = "abcd1234efgh5678"',
        "password: hunter2hunter2",
        "secret=s3cr3t-value",
        '{"token": "abcdefghijklmnop"}',
        "DB_PASSWORD='correcthorse'",
        "client_secret: 9f8e7d6c5b4a",
        "X-API-Key: 0123456789abcdef",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ],
}

NEGATIVES = {
    "email": [
        "@property\ndef name(self): ...",
        "@functools.lru_cache(maxsize=None)",
        "send it to user@ later",
        "user@localhost",
        "x = a@b.T",
        "y = weights@inputs.transpose()",
        "see https://docs.python.org/3/library/json.html",
    ],
    "phone": [
        "Released on 2024-01-15.",
        "Released on 15/01/2024.",
        "Released on 01.02.2024.",
        "Released on 2024.01.15.",
        "at 10:30:00",
        "timestamp 2024-01-15T10:30:00Z",
        "timestamp 2024-01-15 10:30:00.123456",
        "Python 3.11.7",
        "version 10.0.19041",
        "the integer 12345678901",
        "pi is 3.14159265",
        "signed +3.140000",
        "Decimal('+35236450.6')",
        "ports 1000-2000",
        "open 0800-1200",
        "ISBN 978-3-16-148410-0",
        "numbers 6 12 24 48 96 192 384 768 1536 3072",
        "x = np.array([100, 200, 300])",
        "print(100 200 300)",
        "'009-03-04'",
        "'016.016.016.016'",
        "decomposition '<fraction> 0031 2044 0034'",
        "uuid 12345678-1234-5678-1234-567812345678",
    ],
    "ip_address": [
        "Python 3.11.7",
        "version 1.2.3.4.5",
        "bad 999.1.1.1",
        "bad 256.1.1.1",
        "leading 01.02.03.04",
        "slice a[::2]",
        "slice a[1::2]",
        "slice a[::-1]",
        "C++ std::vector<int>",
        "Rust fmt::Debug",
        "unspecified ::",
        "time 12:30:45",
        "mac 00:1a:2b:3c:4d:5e",
        "see https://docs.python.org/3/",
    ],
    "credit_card": [
        "almost 4111 1111 1111 1112",
        "random 1234567890123456",
        "id 9999999999999995",
        "short 4111 1111 1111",
        "ten digits 4111111111",
        "mixed 4111 1111-1111 1111",
        "float 4111111111111111.5",
    ],
    "secret": [
        "password=password",
        "token = self.get_token()",
        "password = getpass.getpass()",
        "api_key=self.api_key",
        "secret_key = os.environ['SECRET_KEY']",
        "Password: Optional",
        "token: str",
        "max_tokens = 12345678",
        'pad_token = "<|endoftext|>"',
        'api_key = "${OPENAI_API_KEY}"',
        "password: short",
        "sk-learn is a nickname",
        "the task-oriented approach",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
        "def login(user, password=None):",
    ],
}


@pytest.mark.parametrize(
    ("kind", "text"), [(kind, text) for kind, texts in POSITIVES.items() for text in texts]
)
def test_positive_is_replaced_and_counted(kind: str, text: str) -> None:
    out, counts = scrub_pii(text)
    assert PLACEHOLDERS[kind] in out
    assert counts == {kind: 1}, (out, counts)


@pytest.mark.parametrize(
    ("kind", "text"), [(kind, text) for kind, texts in NEGATIVES.items() for text in texts]
)
def test_negative_is_untouched(kind: str, text: str) -> None:
    out, counts = scrub_pii(text)
    assert out == text
    assert not counts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('api_key = "abcd1234efgh5678"', 'api_key = "<SECRET>"'),
        ("password: hunter2hunter2\nuser: bob", "password: <SECRET>\nuser: bob"),
        ('{"token": "abcdefghijklmnop", "n": 1}', '{"token": "<SECRET>", "n": 1}'),
        ("SECRET=s3cr3t-value make run", "SECRET=<SECRET> make run"),
        ("url?api_key=abc123def456&page=2", "url?api_key=<SECRET>&page=2"),
        (
            "before\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\nafter",
            "before\n<SECRET>\nafter",
        ),
        ('key = "sk-abcdefghijklmnopqrstuvwx1234"', 'key = "<SECRET>"'),
    ],
)
def test_secret_keeps_key_name_and_surroundings(text: str, expected: str) -> None:
    assert scrub_pii(text)[0] == expected


def test_specific_secret_inside_assignment_is_counted_once() -> None:
    out, counts = scrub_pii('openai_api_key = "sk-abcdefghijklmnopqrstuvwx1234"')
    assert out == 'openai_api_key = "<SECRET>"'
    assert counts == {"secret": 1}


def test_secret_pass_runs_before_phone_and_card() -> None:
    # The digits of a key must not be turned into a phone or card first.
    text = "AKIA2345678901234567 and xoxb-555-123-4567-abcdef"
    out, counts = scrub_pii(text)
    assert out == "<SECRET> and <SECRET>"
    assert counts == {"secret": 2}


def test_mixed_document_counts_per_type() -> None:
    text = textwrap.dedent(
        """\
        From: Jane Doe <jane.doe@example.com>, cc ops@corp.example.org
        Phone: +44 20 7946 0958 or (555) 123-4567, released 2024-01-15 (v3.11.7)
        Card 4111 1111 1111 1111, ref 1234567890123456 (not a card)
        Hosts 10.1.2.3 and 2001:db8::42, slice a[::2]
        export GITHUB_TOKEN=ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789
        password: hunter2hunter2
        """
    )
    out, counts = scrub_pii(text)
    assert counts == {"email": 2, "phone": 2, "credit_card": 1, "ip_address": 2, "secret": 2}
    for placeholder in PLACEHOLDERS.values():
        assert placeholder in out
    for kept in ("2024-01-15", "v3.11.7", "1234567890123456", "a[::2]", "GITHUB_TOKEN=", "password: "):
        assert kept in out
    assert "jane.doe" not in out and "hunter2" not in out and "4111" not in out


def test_scrubbing_twice_changes_nothing_more() -> None:
    text = "\n".join(text for texts in POSITIVES.values() for text in texts)
    once, counts = scrub_pii(text)
    assert sum(counts.values()) == sum(len(texts) for texts in POSITIVES.values())
    twice, counts_again = scrub_pii(once)
    assert twice == once
    assert not counts_again


@pytest.mark.parametrize("kind", PII_TYPES)
def test_only_selected_types_are_scrubbed(kind: str) -> None:
    text = "\n".join(text for texts in POSITIVES.values() for text in texts)
    out, counts = scrub_pii(text, types=[kind])
    assert set(counts) == {kind}
    assert counts[kind] == len(POSITIVES[kind])
    for other, placeholder in PLACEHOLDERS.items():
        assert (placeholder in out) == (other == kind)


def test_unknown_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="names"):
        scrub_pii("text", types=["email", "names"])


def test_empty_types_is_a_no_op() -> None:
    text = "jane@example.com 4111 1111 1111 1111"
    assert scrub_pii(text, types=()) == (text, {})


STDLIB_LIKE_DOCS = '''\
"""Utilities for JSON and paths (a stdlib-docstring-like paragraph).

New in version 3.9; changed in version 3.11.7 (released 2023-12-04, see
https://docs.python.org/3/library/json.html#json.dumps and
https://www.python.org/downloads/release/python-3117/). The default is
``(', ', ': ')`` if *indent* is ``None`` and ``(',', ': ')`` otherwise.

Slices such as ``seq[::2]``, ``seq[1::2]`` and ``seq[::-1]`` are fine, as are
C++ names like ``std::vector`` and ``std::map<int, int>``. Ports 1000-2000 and
8000-8080 are reserved; pi is roughly 3.14159 and e is 2.71828. The epoch
1700000000 was 2023-11-14T22:13:20Z. Run ``python3.11 -m pip install x==1.2.3``.
Times like 10:30:00 or 23:59:59.999999 and dates like 15/01/2024 stay.
Use the password and token parameters; the api_key argument is optional.
"""

import functools
import os


@functools.lru_cache(maxsize=128)
def join(a: str, *paths: str, sep: str = "/") -> str:
    """Join two or more pathname components, inserting '/' as needed."""
    parts = [a, *paths][::-1][::-1]
    password = os.environ.get("PASSWORD")
    token = get_token(password=password)
    matrix = weights @ inputs
    version = (3, 11, 7)
    return sep.join(parts[0:10:2]) + f"{version[0]}.{version[1]}" + str(token) + str(matrix)
'''


@pytest.mark.parametrize(
    "text",
    [
        STDLIB_LIKE_DOCS,
        json.dumps.__doc__,
        json.loads.__doc__,
        os.path.join.__doc__,
        textwrap.dedent.__doc__,
    ],
    ids=["stdlib-like", "json.dumps", "json.loads", "os.path.join", "textwrap.dedent"],
)
def test_code_and_docs_without_pii_stay_byte_identical(text: str) -> None:
    out, counts = scrub_pii(text)
    assert out == text
    assert not counts


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111 1111 1111 1111", True),
        ("4111-1111-1111-1111", True),
        ("378282246310005", True),
        ("79927398713", True),
        ("4111111111111112", False),
        ("1234567890123456", False),
        ("79927398710", False),
        ("", False),
        ("7", False),
        ("4111x111111111111", False),
    ],
)
def test_luhn_valid(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


def test_unicode_text_keeps_alignment_when_lowercasing_changes_length() -> None:
    # 'İ'.lower() is two characters; the secret pass must still cut the right span.
    text = "İİİ password: hunter2hunter2 İ"
    assert scrub_pii(text) == ("İİİ password: <SECRET> İ", {"secret": 1})
