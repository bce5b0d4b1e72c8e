"""napari glue: dock widgets, reader, writer, sample data and result layers.

Everything here collects parameters, runs the Qt-free core in workers and turns results
into layers; nothing here computes. The core beside it imports no Qt and no napari.
"""
