"""Pictures of the gate's decisions: mask overlays, grids and segmentation maps (``draw``), and the
``msvit visualize`` command (``cli``)."""
