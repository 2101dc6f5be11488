"""Pure numpy/torch statistics of anchorscan: no Beam import below this package."""
