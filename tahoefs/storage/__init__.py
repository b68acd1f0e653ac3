"""The storage node (an ASGI app over a share store on local disk) and the HTTP client for one node.
Knows nothing of files, keys or directories: shares are opaque bytes named by storage index and number."""
