"""Specification of capability strings (tahoefs.formats.caps) and their base32 (formats.hashing)."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tahoefs.errors import BadCapError, UsageError
from tahoefs.formats.caps import MAX_SHARES, FileCap, LiteralCap, VerifyCap, parse_cap
from tahoefs.formats.hashing import b32decode, b32encode, storage_index_for_key
from tahoefs.limits import LITERAL_CAP_MAX as LITERAL_MAX

EXAMPLES = settings(max_examples=150, deadline=None)

keys = st.binary(min_size=32, max_size=32)
hashes = st.binary(min_size=32, max_size=32)
storage_indexes = st.binary(min_size=16, max_size=16)
sizes = st.integers(min_value=0, max_value=1 << 62)
k_and_n = st.integers(min_value=1, max_value=MAX_SHARES).flatmap(
    lambda n: st.tuples(st.integers(min_value=1, max_value=n), st.just(n))
)
literal_data = st.binary(max_size=LITERAL_MAX)


@st.composite
def file_caps(draw: st.DrawFn) -> FileCap:
    k, n = draw(k_and_n)
    return FileCap(draw(keys), draw(hashes), k, n, draw(sizes))


@st.composite
def verify_caps(draw: st.DrawFn) -> VerifyCap:
    k, n = draw(k_and_n)
    return VerifyCap(draw(storage_indexes), draw(hashes), k, n, draw(sizes))


any_caps = st.one_of(st.builds(LiteralCap, literal_data), file_caps(), verify_caps())

KEY = bytes(range(32))
HASH = bytes(range(100, 132))
SI = bytes(range(16))
B32_KEY = b32encode(KEY)
B32_HASH = b32encode(HASH)
B32_SI = b32encode(SI)
GOOD_FILE = f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:12345"
GOOD_VERIFY = f"tahoefs:file-verify:v1:{B32_SI}:{B32_HASH}:3:10:12345"


# --- round trips -------------------------------------------------------------------------------------------


@EXAMPLES
@given(literal_data)
def test_literal_cap_round_trips_through_its_string(data: bytes) -> None:
    cap = LiteralCap(data)
    parsed = parse_cap(str(cap))
    assert parsed == cap
    assert isinstance(parsed, LiteralCap)
    assert parsed.size == len(data)


@EXAMPLES
@given(file_caps())
def test_file_cap_round_trips_through_its_string(cap: FileCap) -> None:
    parsed = parse_cap(str(cap))
    assert parsed == cap
    assert isinstance(parsed, FileCap)
    assert str(parsed) == str(cap)


@EXAMPLES
@given(verify_caps())
def test_verify_cap_round_trips_through_its_string(cap: VerifyCap) -> None:
    parsed = parse_cap(str(cap))
    assert parsed == cap
    assert isinstance(parsed, VerifyCap)
    assert str(parsed) == str(cap)


@EXAMPLES
@given(any_caps, st.sampled_from([" ", "\n", "\t", "\r\n", "  \t"]), st.sampled_from(["", " ", "\n"]))
def test_parse_cap_ignores_surrounding_whitespace(cap: LiteralCap | FileCap | VerifyCap, pre, post) -> None:
    assert parse_cap(pre + str(cap) + post) == cap


@EXAMPLES
@given(any_caps)
def test_caps_never_contain_a_slash_or_whitespace(cap: LiteralCap | FileCap | VerifyCap) -> None:
    text = str(cap)
    assert "/" not in text
    assert not any(c.isspace() for c in text)
    # Stronger: caps use a small, URL- and shell-safe ASCII alphabet.
    assert re.fullmatch(r"[a-z0-9:-]+", text)


@EXAMPLES
@given(any_caps, st.text(alphabet=string.ascii_letters + string.digits + "/._-", max_size=30))
def test_cap_slash_path_splits_unambiguously_at_the_first_slash(cap, path: str) -> None:
    cap_text, _, rest = f"{cap}/{path}".partition("/")
    assert parse_cap(cap_text) == cap
    assert rest == path


# --- the verify cap of a read cap ------------------------------------------------------------------------


@EXAMPLES
@given(file_caps())
def test_file_cap_verify_cap_has_the_storage_index_of_its_key(cap: FileCap) -> None:
    vcap = cap.verify_cap()
    assert vcap.storage_index == storage_index_for_key(cap.key)
    assert vcap.storage_index == cap.storage_index
    assert len(vcap.storage_index) == 16
    assert (vcap.ueb_hash, vcap.needed, vcap.total, vcap.size) == (
        cap.ueb_hash,
        cap.needed,
        cap.total,
        cap.size,
    )


@EXAMPLES
@given(file_caps())
def test_verify_cap_string_does_not_reveal_the_key(cap: FileCap) -> None:
    assume(cap.key != cap.ueb_hash)  # else the key's encoding shows up as the (public) hash
    text = str(cap.verify_cap())
    assert b32encode(cap.key) not in text
    assert parse_cap(text) == cap.verify_cap()


def test_storage_index_is_a_deterministic_function_of_the_key() -> None:
    assert storage_index_for_key(KEY) == storage_index_for_key(bytes(KEY))
    assert storage_index_for_key(KEY) != storage_index_for_key(bytes(32))


def test_literal_cap_of_an_empty_file_round_trips() -> None:
    assert str(LiteralCap(b"")) == "tahoefs:lit:v1:"
    assert parse_cap("tahoefs:lit:v1:") == LiteralCap(b"")


def test_literal_cap_accepts_exactly_literal_max_bytes() -> None:
    cap = LiteralCap(b"x" * LITERAL_MAX)
    assert parse_cap(str(cap)) == cap


def test_known_good_strings_parse_to_their_fields() -> None:
    assert parse_cap(GOOD_FILE) == FileCap(KEY, HASH, 3, 10, 12345)
    assert parse_cap(GOOD_VERIFY) == VerifyCap(SI, HASH, 3, 10, 12345)


def test_k_equal_to_n_and_the_extremes_are_accepted() -> None:
    for k, n in [(1, 1), (MAX_SHARES, MAX_SHARES), (1, MAX_SHARES)]:
        cap = FileCap(KEY, HASH, k, n, 0)
        assert parse_cap(str(cap)) == cap
    big = FileCap(KEY, HASH, 1, 1, 1 << 62)
    assert parse_cap(str(big)) == big


# --- arbitrary input -------------------------------------------------------------------------------------


def _parse_or_badcap(text: str) -> None:
    try:
        cap = parse_cap(text)
    except BadCapError as exc:
        assert str(exc)  # always one clear sentence, never empty
    else:
        # Anything accepted is a real cap whose canonical string parses back to the same value.
        assert parse_cap(str(cap)) == cap


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_cap_on_arbitrary_text_raises_only_badcaperror(text: str) -> None:
    _parse_or_badcap(text)


@settings(max_examples=200, deadline=None)
@given(st.binary().map(lambda b: b.decode("latin-1")))
def test_parse_cap_on_arbitrary_latin1_raises_only_badcaperror(text: str) -> None:
    _parse_or_badcap(text)


_field = st.one_of(
    st.sampled_from(["", "0", "1", "3", "10", "256", "257", "03", "-1", "+1", "1e3", "9" * 21, "v1"]),
    st.sampled_from([B32_KEY, B32_HASH, B32_SI, B32_KEY.upper(), B32_KEY + "=", B32_KEY[:-1]]),
    st.binary(max_size=40).map(b32encode),
    st.text(alphabet=string.ascii_letters + string.digits + "=/ ", max_size=60),
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["lit", "file", "file-verify", "dir", "", "FILE"]),
    st.sampled_from(["v1", "v2", "", "V1"]),
    st.lists(_field, max_size=7),
)
def test_parse_cap_on_structured_garbage_raises_only_badcaperror(kind: str, version: str, fields) -> None:
    _parse_or_badcap(":".join(["tahoefs", kind, version, *fields]))


@EXAMPLES
@given(any_caps, st.data())
def test_parse_cap_on_a_truncated_or_extended_cap_raises_only_badcaperror(cap, data) -> None:
    text = str(cap)
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    _parse_or_badcap(text[:cut])
    _parse_or_badcap(text + data.draw(st.text(max_size=5)))


# --- specific malformed caps -----------------------------------------------------------------------------


MALFORMED = [
    # wrong prefix
    ("", "should start with 'tahoefs:'"),
    ("URI:CHK:abc:def:3:10:100", "should start with 'tahoefs:'"),
    ("Tahoefs:lit:v1:", "should start with 'tahoefs:'"),
    ("tahoe:lit:v1:", "should start with 'tahoefs:'"),
    (" x tahoefs:lit:v1:", "should start with 'tahoefs:'"),
    # too few parts
    ("tahoefs:", "expected tahoefs:KIND:VERSION"),
    ("tahoefs:file", "expected tahoefs:KIND:VERSION"),
    # unknown kind
    ("tahoefs:mdmf:v1:abc", "unknown capability kind 'mdmf'"),
    ("tahoefs::v1:abc", "unknown capability kind ''"),
    (f"tahoefs:FILE:v1:{B32_KEY}:{B32_HASH}:3:10:1", "unknown capability kind 'FILE'"),
    # bad version
    (f"tahoefs:file:v2:{B32_KEY}:{B32_HASH}:3:10:1", "unsupported capability version 'v2'"),
    (f"tahoefs:file:V1:{B32_KEY}:{B32_HASH}:3:10:1", "unsupported capability version 'V1'"),
    ("tahoefs:lit::", "unsupported capability version ''"),
    # wrong field count
    ("tahoefs:lit:v1", "malformed literal capability"),
    ("tahoefs:lit:v1:aa:aa", "malformed literal capability"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10", "expected 5 fields"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:1:1", "expected 5 fields"),
    (f"tahoefs:file-verify:v1:{B32_SI}:{B32_HASH}:3:10", "expected 5 fields"),
    ("tahoefs:file:v1", "expected 5 fields"),
    # non-base32
    (f"tahoefs:file:v1:{B32_KEY.upper()}:{B32_HASH}:3:10:1", "key field is not base32"),
    (f"tahoefs:file:v1:{'1' + B32_KEY[1:]}:{B32_HASH}:3:10:1", "key field is not base32"),
    (f"tahoefs:file:v1:{'0' + B32_KEY[1:]}:{B32_HASH}:3:10:1", "key field is not base32"),
    (f"tahoefs:file:v1:{B32_KEY}====:{B32_HASH}:3:10:1", "key field is not base32"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH[:-1]}!:3:10:1", "hash field is not base32"),
    (f"tahoefs:file-verify:v1:{B32_SI[:-1]}8:{B32_HASH}:3:10:1", "storage index field is not base32"),
    ("tahoefs:lit:v1:ABC", "data field is not base32"),
    ("tahoefs:lit:v1:a", "data field is not base32"),
    ("tahoefs:lit:v1:ab", "data field is not base32"),  # non-canonical trailing bits
    # wrong lengths
    (f"tahoefs:file:v1:{b32encode(bytes(31))}:{B32_HASH}:3:10:1", "key field must be 32 bytes"),
    (f"tahoefs:file:v1:{b32encode(bytes(33))}:{B32_HASH}:3:10:1", "key field must be 32 bytes"),
    (f"tahoefs:file:v1:{B32_KEY}:{b32encode(bytes(16))}:3:10:1", "hash field must be 32 bytes"),
    (f"tahoefs:file-verify:v1:{B32_KEY}:{B32_HASH}:3:10:1", "storage index field must be 16 bytes"),
    (f"tahoefs:file:v1:{B32_SI}:{B32_HASH}:3:10:1", "key field must be 32 bytes"),
    (f"tahoefs:lit:v1:{b32encode(bytes(LITERAL_MAX + 1))}", "too long"),
    # k, n, size out of range
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:4:3:1", "n=3 is out of range 4..256"),
    (f"tahoefs:file-verify:v1:{B32_SI}:{B32_HASH}:10:3:1", "n=3 is out of range 10..256"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:0:3:1", "k=0 is out of range 1..256"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:257:257:1", "k=257 is out of range 1..256"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:257:1", "n=257 is out of range 3..256"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:{(1 << 62) + 1}", "size=.* is out of range"),
    # leading zeros and other non-canonical numbers
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:03:10:1", "k field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:010:1", "n field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:00", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:01", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:-1", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:+3:10:1", "k field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:1e3", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}: 3:10:1", "k field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:1_000", "size field is not a number"),
    # huge numbers are refused before being converted
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:{'9' * 21}", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:3:10:{'9' * 5000}", "size field is not a number"),
    (f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:{'9' * 20}:10:1", "is out of range 1..256"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_cap_raises_badcaperror_with_a_message(text: str, message: str) -> None:
    with pytest.raises(BadCapError, match=message) as info:
        parse_cap(text)
    assert str(info.value).strip()


def test_badcaperror_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_cap("nonsense")


@pytest.mark.parametrize("digit", ["²", "³", "¹"])
@pytest.mark.parametrize("field", ["k", "n", "size"])
def test_parse_cap_raises_badcaperror_for_superscript_digits(digit: str, field: str) -> None:
    values = {"k": "3", "n": "10", "size": "5"}
    values[field] = digit
    text = f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:{values['k']}:{values['n']}:{values['size']}"
    with pytest.raises(BadCapError):
        parse_cap(text)


@pytest.mark.parametrize("digit", ["٣", "３", "३"])
def test_parse_cap_rejects_non_ascii_decimal_digits(digit: str) -> None:
    with pytest.raises(BadCapError):
        parse_cap(f"tahoefs:file:v1:{B32_KEY}:{B32_HASH}:1:{digit}:5")


# --- base32 ----------------------------------------------------------------------------------------------


@EXAMPLES
@given(st.binary(max_size=100))
def test_b32_round_trips(data: bytes) -> None:
    text = b32encode(data)
    assert b32decode(text) == data
    assert re.fullmatch(r"[a-z2-7]*", text)
    assert len(text) == -(-len(data) * 8 // 5)


def test_b32_known_vectors_match_rfc4648_lowercased_unpadded() -> None:
    vectors = {
        b"": "",
        b"f": "my",
        b"fo": "mzxq",
        b"foo": "mzxw6",
        b"foob": "mzxw6yq",
        b"fooba": "mzxw6ytb",
        b"foobar": "mzxw6ytboi",
    }
    for data, text in vectors.items():
        assert b32encode(data) == text
        assert b32decode(text) == data


@EXAMPLES
@given(st.binary(min_size=1, max_size=60))
def test_b32decode_rejects_uppercase(data: bytes) -> None:
    text = b32encode(data)
    upper = text.upper()
    if upper == text:  # an encoding made only of the digits 2-7 has no letter to uppercase
        upper = "A" + text[1:]
    with pytest.raises(ValueError):
        b32decode(upper)


@EXAMPLES
@given(st.binary(min_size=1, max_size=60).filter(lambda d: len(d) % 5))
def test_b32decode_rejects_padding(data: bytes) -> None:
    text = b32encode(data)
    padded = text + "=" * (-len(text) % 8)
    assert padded != text
    with pytest.raises(ValueError):
        b32decode(padded)


@pytest.mark.parametrize("text", ["a", "abc", "abcdef", "aaaaaaaaa", "aaaaaaaaaaa", "aaaaaaaaaaaaaa"])
def test_b32decode_rejects_impossible_lengths(text: str) -> None:
    with pytest.raises(ValueError):
        b32decode(text)


@pytest.mark.parametrize(
    "text", ["ab", "mz", "mzxr", "mzxw7", "mzxw6yr", "mzxw6ytboj", "77"]
)  # non-zero trailing bits
def test_b32decode_rejects_non_canonical_trailing_bits(text: str) -> None:
    with pytest.raises(ValueError, match="non-canonical"):
        b32decode(text)


@pytest.mark.parametrize("text", ["0a", "1a", "8a", "9a", "a!", "a ", " a", "é" + "a", "a\n", "my=="])
def test_b32decode_rejects_characters_outside_the_alphabet(text: str) -> None:
    with pytest.raises(ValueError):
        b32decode(text)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.text(max_size=20), st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567=AB01 ", max_size=20))
)
def test_b32decode_accepts_exactly_the_canonical_encodings(text: str) -> None:
    try:
        data = b32decode(text)
    except ValueError:
        return
    assert b32encode(data) == text
