"""Mixed-scale Swin (the paper's Section 4.2.3, Table 2 and Appendix E.3).

The gate decides per coarse region (S_c px) whether it is processed at fine scale. Fine regions
follow timm's Swin path from its small patches, packed: per attention window only the present fine
tokens, empty windows never computed. Coarse regions are embedded once by their own linear
embedding and join the token grid at the stage whose token scale equals S_c; from there on the
model is timm's dense Swin. Build it with ``msvit.from_timm(<timm SwinTransformer>)``.
"""

from msvit.models.swin.model import MixedScaleSwin
from msvit.models.swin.timm_compat import is_timm_swin, swin_from_timm

__all__ = ["MixedScaleSwin", "is_timm_swin", "swin_from_timm"]
