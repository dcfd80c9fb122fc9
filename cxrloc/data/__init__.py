"""Data: NIH tables, image reading, the prepared cache, splits and datasets."""
