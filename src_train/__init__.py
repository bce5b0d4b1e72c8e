"""Training and evaluation for the napari-bach Mask R-CNN (uses the plugin's Qt-free core)."""
