"""Shared test settings: run on CPU and keep XLA from grabbing every thread per worker."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
