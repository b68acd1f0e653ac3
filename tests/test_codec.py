"""Specification of the segment codec (tahoefs.formats.codec): AES-CTR + zfec + block hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tahoefs.formats.codec import block_hash, crypt, decode_segment, encode_segment
from tahoefs.formats.hashing import TAG_BLOCK, tagged_hash

EXAMPLES = settings(max_examples=100, deadline=None)

keys = st.binary(min_size=32, max_size=32)
offsets = st.integers(min_value=0, max_value=1 << 40).map(lambda i: i * 16)
plaintexts = st.binary(min_size=1, max_size=3000)
k_and_n = st.integers(min_value=1, max_value=20).flatmap(
    lambda n: st.tuples(st.integers(min_value=1, max_value=n), st.just(n))
)
KEY = bytes(range(32))


def subset(data: st.DataObject, n: int, size: int) -> list[int]:
    """`size` distinct share numbers out of range(n), in the order hypothesis chose (not sorted)."""
    return data.draw(st.permutations(range(n)))[:size]


# --- crypt -----------------------------------------------------------------------------------------------


@EXAMPLES
@given(keys, st.binary(max_size=200), st.binary(max_size=200), st.integers(min_value=0, max_value=1 << 80))
def test_crypt_at_an_offset_continues_the_stream(key: bytes, a: bytes, b: bytes, block: int) -> None:
    a = a[: len(a) - len(a) % 16]
    start = block * 16
    assert crypt(key, start, a + b)[len(a) :] == crypt(key, start + len(a), b)
    assert crypt(key, 0, a + b)[len(a) :] == crypt(key, len(a), b)


@EXAMPLES
@given(keys, offsets, st.binary(max_size=500))
def test_crypt_is_its_own_inverse_and_preserves_length(key: bytes, offset: int, data: bytes) -> None:
    encrypted = crypt(key, offset, data)
    assert len(encrypted) == len(data)
    assert crypt(key, offset, encrypted) == data


def test_crypt_carries_the_counter_across_a_64_bit_boundary() -> None:
    start = ((1 << 64) - 1) * 16  # the last block before the low 64 bits of the counter wrap
    data = bytes(64)
    assert crypt(KEY, start, data)[16:] == crypt(KEY, start + 16, data[16:])


def test_crypt_is_aes_256_ctr_with_a_128_bit_big_endian_counter_starting_at_offset_over_16() -> None:
    from Crypto.Cipher import AES

    ecb = AES.new(KEY, AES.MODE_ECB)
    keystream = b"".join(ecb.encrypt((5 + i).to_bytes(16, "big")) for i in range(2))
    assert crypt(KEY, 5 * 16, bytes(32)) == keystream


def test_different_keys_and_offsets_give_different_ciphertext() -> None:
    data = bytes(64)
    assert crypt(KEY, 0, data) != crypt(bytes(32), 0, data)
    assert crypt(KEY, 0, data) != crypt(KEY, 16, data)
    assert crypt(KEY, 0, data) != data


@pytest.mark.parametrize("offset", [1, 8, 15, 17, 1000])
def test_crypt_rejects_offsets_that_are_not_a_multiple_of_16(offset: int) -> None:
    with pytest.raises(ValueError, match="multiples of the AES block size"):
        crypt(KEY, offset, b"data")


# --- encode_segment --------------------------------------------------------------------------------------


@EXAMPLES
@given(keys, offsets, plaintexts, k_and_n)
def test_encode_segment_returns_n_equal_blocks_and_their_hashes(key, offset, plaintext, kn) -> None:
    k, n = kn
    blocks, hashes = encode_segment(key, offset, plaintext, k, n)
    block_size = -(-len(plaintext) // k)
    assert len(blocks) == len(hashes) == n
    assert all(len(b) == block_size for b in blocks)
    assert hashes == [block_hash(b) for b in blocks]
    assert all(len(h) == 32 for h in hashes)


@EXAMPLES
@given(keys, offsets, plaintexts, k_and_n)
def test_encode_segment_primary_blocks_are_the_padded_ciphertext(key, offset, plaintext, kn) -> None:
    k, n = kn
    blocks, _ = encode_segment(key, offset, plaintext, k, n)
    joined = b"".join(blocks[:k])
    ciphertext = crypt(key, offset, plaintext)
    assert joined[: len(plaintext)] == ciphertext
    assert joined[len(plaintext) :] == b"\0" * (len(joined) - len(plaintext))


def test_encode_segment_is_deterministic() -> None:
    assert encode_segment(KEY, 32, b"hello world" * 10, 3, 7) == encode_segment(
        KEY, 32, b"hello world" * 10, 3, 7
    )


def test_block_hash_is_tagged_and_tells_blocks_apart() -> None:
    assert block_hash(b"abc") == tagged_hash(TAG_BLOCK, b"abc")
    assert block_hash(b"abc") != block_hash(b"abd")
    assert block_hash(b"") != block_hash(b"\0")


# --- decode_segment --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(keys, offsets, plaintexts, k_and_n, st.data())
def test_decode_segment_recovers_the_plaintext_from_any_k_blocks(key, offset, plaintext, kn, data) -> None:
    k, n = kn
    blocks, _ = encode_segment(key, offset, plaintext, k, n)
    chosen = subset(data, n, k)
    received = {i: blocks[i] for i in chosen}
    assert decode_segment(key, offset, len(plaintext), received, k, n) == plaintext


@EXAMPLES
@given(keys, offsets, plaintexts, k_and_n, st.data())
def test_decode_segment_accepts_more_than_k_blocks(key, offset, plaintext, kn, data) -> None:
    k, n = kn
    blocks, _ = encode_segment(key, offset, plaintext, k, n)
    count = data.draw(st.integers(min_value=k, max_value=n))
    received = {i: blocks[i] for i in subset(data, n, count)}
    assert decode_segment(key, offset, len(plaintext), received, k, n) == plaintext


@EXAMPLES
@given(keys, offsets, plaintexts, st.integers(min_value=1, max_value=20), st.data())
def test_n_equal_to_k_round_trips(key, offset, plaintext, k, data) -> None:
    blocks, _ = encode_segment(key, offset, plaintext, k, k)
    assert len(blocks) == k
    received = {i: blocks[i] for i in subset(data, k, k)}
    assert decode_segment(key, offset, len(plaintext), received, k, k) == plaintext


@EXAMPLES
@given(plaintexts, k_and_n, st.data())
def test_decode_segment_with_fewer_than_k_blocks_raises_valueerror(plaintext, kn, data) -> None:
    k, n = kn
    blocks, _ = encode_segment(KEY, 0, plaintext, k, n)
    count = data.draw(st.integers(min_value=0, max_value=k - 1))
    received = {i: blocks[i] for i in subset(data, n, count)}
    with pytest.raises(ValueError, match=f"need {k} blocks, got {count}"):
        decode_segment(KEY, 0, len(plaintext), received, k, n)


def test_one_byte_segment_with_many_shares_round_trips() -> None:
    blocks, _ = encode_segment(KEY, 0, b"x", 3, 20)
    assert all(len(b) == 1 for b in blocks)
    assert decode_segment(KEY, 0, 1, {19: blocks[19], 4: blocks[4], 11: blocks[11]}, 3, 20) == b"x"


def test_maximum_shares_round_trip() -> None:
    plaintext = bytes(range(256)) * 3
    blocks, _ = encode_segment(KEY, 0, plaintext, 100, 256)
    received = {i: blocks[i] for i in range(156, 256)}
    assert decode_segment(KEY, 0, len(plaintext), received, 100, 256) == plaintext


@EXAMPLES
@given(st.binary(min_size=1, max_size=4000), st.sampled_from([16, 64, 1024]), k_and_n, st.data())
def test_segments_of_a_file_decode_back_to_the_file(file_data, segment_size, kn, data) -> None:
    k, n = kn
    out = []
    for start in range(0, len(file_data), segment_size):
        segment = file_data[start : start + segment_size]
        blocks, _ = encode_segment(KEY, start, segment, k, n)
        received = {i: blocks[i] for i in subset(data, n, k)}
        out.append(decode_segment(KEY, start, len(segment), received, k, n))
    assert b"".join(out) == file_data


def test_decoding_at_the_wrong_offset_or_key_does_not_give_the_plaintext() -> None:
    plaintext = b"secret data " * 8
    blocks, _ = encode_segment(KEY, 64, plaintext, 2, 4)
    received = {1: blocks[1], 3: blocks[3]}
    assert decode_segment(KEY, 64, len(plaintext), received, 2, 4) == plaintext
    assert decode_segment(KEY, 0, len(plaintext), received, 2, 4) != plaintext
    assert decode_segment(bytes(32), 64, len(plaintext), received, 2, 4) != plaintext
