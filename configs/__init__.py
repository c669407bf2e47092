"""ml_collections configs: one `get_config()` per file (big_vision style)."""
