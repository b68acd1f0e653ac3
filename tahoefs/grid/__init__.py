"""The grid client: configuration, placement, upload and download. No FUSE, no CLI."""
