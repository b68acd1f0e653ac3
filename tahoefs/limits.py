"""Every constant that bounds memory or time, in one place.

Client memory in flight is bounded by these windows; the figures in the comments are for the default
3-of-10 encoding and 1 MiB segments.
"""

MiB = 1024 * 1024

# Plaintext bytes per segment. 1 MiB segments cost half the CPU of 128 KiB ones (fewer calls, fewer
# HTTP chunks) and keep one segment's blocks small enough to hold a few in flight.
SEGMENT_SIZE = 1 * MiB

# Segments encoded but not yet acknowledged by the share streams during an upload. In-flight bytes are
# at most UPLOAD_WINDOW_SEGMENTS * SEGMENT_SIZE * n/k (4 * 1 MiB * 10/3 ≈ 13.3 MiB) plus the HTTP
# client's socket buffers.
UPLOAD_WINDOW_SEGMENTS = 4

# Segments an upload reads and encodes in a worker thread (AES, zfec and SHA-256 release the GIL) ahead of
# the one being handed to the share streams, so both cores work: a 1 GiB put went from 12.5 s to 9.0 s
# (2 ahead: 8.8 s for 6 MiB more RSS). Each holds its plaintext and its n blocks (1 MiB + 3.3 MiB at
# 3-of-10) on top of UPLOAD_WINDOW_SEGMENTS' 13 MiB.
ENCODE_AHEAD_SEGMENTS = 1

# A mount's upload returns once `happy` nodes committed their shares; the PUTs of the other shares finish
# in the background, as long as the shares still being sent by all such uploads total at most this many
# bytes (each counted whole). Beyond, an upload waits for all its PUTs. For small files this takes the
# slowest nodes off the path of close(): 0.5 ms on average, up to 2 ms, of a 6 KB file's 8 ms.
UPLOAD_LINGER_BYTES = 8 * MiB

# CPU work on fewer bytes than this runs on the event loop instead of a worker thread (grid/cpu.py): a
# thread hop costs about 160 µs, more than encoding a small file's segment (about 45 µs for 6 KB).
THREAD_MIN_BYTES = 64 * 1024

# Segments fetched ahead of the reader during a sequential download: at most this many segments'
# k blocks (≈ 1 MiB each) plus their decoded plaintext are held at once.
DOWNLOAD_WINDOW_SEGMENTS = 4

# `tahoefs put FILE` (no destination) keeps files up to this size inside their cap (a literal cap) and
# touches no node. Files stored inline in a directory entry (up to 4 KiB) print as literal caps too, so a
# literal cap may hold up to LITERAL_CAP_MAX bytes.
LITERAL_MAX = 56
LITERAL_CAP_MAX = 4096

# Block hashes per chunk of a share's hash list. A reader fetches one chunk (32 B * 4096 = 128 KiB)
# to verify any block in it; files under 4 GiB at 1 MiB segments have a single chunk.
HASH_CHUNK_LEAVES = 4096

# First suffix fetched from a share: the footer, the trailer and, for files of up to ~2 GiB (2034 segments
# at n=10), every block hash; larger files fetch the 128 KiB leaf chunk a segment needs on first use.
TRAILER_PROBE_BYTES = 64 * 1024

# Upper bound of a share trailer we agree to read (defends against a node claiming a huge trailer).
MAX_TRAILER_BYTES = 64 * MiB

# Seconds: connecting to a node; a node that does not answer a request (or the next part of a
# streamed body) within NODE_STALL_TIMEOUT is dropped for this operation.
NODE_CONNECT_TIMEOUT = 5.0
NODE_STALL_TIMEOUT = 20.0

# Seconds a download waits for nodes to report which shares they hold, once k distinct shares are
# known, before it starts with what it has.
LOCATE_GRACE = 0.25

# Hedged reads (grid/download.py). A fetch is late once it has taken longer than
# max(HEDGE_FLOOR, HEDGE_FACTOR x the typical fetch time), the typical time being the lower median of
# the nodes' moving averages seen by this reader. When a segment's blocks are not all in by then, one more
# fetch per missing block starts, of another share from another node; the first k verified blocks win and
# the others are cancelled. A segment thus has at most 2k blocks in flight (2 x 1/3 MiB at 3-of-10). A
# primary share (free to decode) is preferred only while its node's average is under the same bound.
# The floor keeps a grid of fast nodes from hedging on every hiccup of a busy machine.
HEDGE_FLOOR = 0.3
HEDGE_FACTOR = 3.0

# Node: refuse new shares when free space would fall below this many bytes.
NODE_MIN_FREE_BYTES = 64 * MiB

# Node: shares of at most this many bytes are rows of the node's SQLite database instead of files
# (storage/smallshares.py). A share being received is held in memory up to this size before it spills to
# a temp file, so a node holds at most 512 concurrent uploads x 64 KiB = 32 MiB of bodies.
SMALL_SHARE_MAX_BYTES = 64 * 1024

# Node: the largest share or request body accepted.
NODE_MAX_SHARE_BYTES = 1 << 40

# Node: the largest mutable slot (the share bytes of one PUT /v1/mutable/SI/N) accepted. Slot bodies
# are held whole by the client, so this bounds client memory per slot read or write too.
NODE_MAX_SLOT_BYTES = 4 * MiB

# Check --verify reads a share in requests of whole blocks up to this many bytes; at most
# VERIFY_PARALLEL_SHARES shares are being verified at once, so verify holds ≈ 8 MiB of share data.
VERIFY_RANGE_BYTES = 2 * MiB
VERIFY_PARALLEL_SHARES = 4

# Deep check: objects (files, directories' entry lists) checked or repaired at the same time, and files
# located together: one batch query per node for CHECK_BATCH files (QUERY_BATCH storage indexes per
# request; the node accepts at most 1000) instead of one list request per node per file.
CHECK_PARALLEL_OBJECTS = 8
CHECK_BATCH = 250
QUERY_BATCH = 500
