"""The FUSE filesystem (pyfuse3 + trio) over the grid layer: inodes, spool files, operations, mount."""
