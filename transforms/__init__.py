"""Beam DoFns, PTransforms, the CombineFn and I/O of anchorscan."""
