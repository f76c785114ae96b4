"""The corpus descriptors shipped with the harness (one file per corpus)."""
