"""elrea-ray: ELREA (Ensembles of Low-Rank Expert Adapters, Li et al., ICLR 2025) on Ray.

The library never starts Ray and does nothing at import time; entry scripts in `jobs/`
and the Serve builder in `serve_apps/` do.
"""

__version__ = "0.1.0"
