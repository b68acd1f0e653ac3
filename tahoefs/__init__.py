"""tahoefs: a FUSE filesystem over an encrypted, erasure-coded grid of storage nodes.

Layers, bottom to top (a lower layer never imports a higher one):

    formats/   caps, hashes, share layout, segment codec     pure: no I/O
    storage/   the storage node (ASGI app, disk store) and the HTTP client for one node
    grid/      grid config, placement, upload, download
    cli/       the `tahoefs` command
"""

__version__ = "0.1.0"
