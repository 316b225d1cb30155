"""Pure renderers: a `Policy` in, data out (nft JSON, PF text, PowerShell). No I/O."""
