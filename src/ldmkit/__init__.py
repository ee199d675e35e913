"""ldmkit: train, sample and evaluate latent diffusion models."""

__version__ = "0.1.0"
