"""Responsible generation: SynthID-Text watermarking and detection, safety screening.

Pure functions and small stateful helpers the sampler and the server call, so offline generation,
serving and tests share one implementation.
"""
