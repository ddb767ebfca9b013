"""Test-wide defaults: a short collective timeout so a broken test fails instead of hanging."""
import os

os.environ.setdefault("PLAIT_TIMEOUT_S", "60")
