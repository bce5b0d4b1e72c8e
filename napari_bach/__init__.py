"""napari-bach: nucleus segmentation and BACH tissue class for H&E histology in napari."""
__version__ = "0.1.0"
