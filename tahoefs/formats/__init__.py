"""Pure formats and crypto: capabilities, tagged hashes, the share layout and the segment codec.
Nothing in this package does I/O."""
