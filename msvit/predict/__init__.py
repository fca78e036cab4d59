"""``msvit predict``: top-k classes of image files, folders and globs (``msvit.predict.cli``).

``msvit.predict.inputs`` turns the arguments into files and reads them, ``msvit.predict.loading``
builds the model from a checkpoint or a timm name, ``msvit.predict.results`` writes the rows
(CSV or JSON). The model library does the rest: ``msvit.eval_transform`` preprocesses, the model's
packed forward (or ``msvit.compile_packed``) classifies.
"""
