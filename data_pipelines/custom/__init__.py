"""Task `custom`: your own labelled structures (docs/custom_data.md)."""
