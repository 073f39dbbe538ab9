"""The diffusion core: pipeline loading, the DDIM step with log-probs, the trajectory sampler, LoRA.

Import from the submodules; this package's import stays light (no torch) so that config checks are fast.
"""
