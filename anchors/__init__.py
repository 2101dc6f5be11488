"""Everything of anchorscan that does not need Beam: the maths (sufficient statistics, anchor,
calibration, heads, metrics), the backbones and their features, decoding and cropping, file
formats, manifests and dataset readers. Nothing below this package imports Beam (an
import-linter contract in `make test` checks it), so all of it is testable with plain arrays."""
