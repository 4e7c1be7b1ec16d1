"""File-name conventions every layer shares: which files are images."""

# Suffixes (lower case) of the image files commands read: inputs, crops, captions, evaluation.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
