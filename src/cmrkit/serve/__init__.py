"""``cmrkit serve``: a search service (FastAPI) and web page over a routed gallery index."""
