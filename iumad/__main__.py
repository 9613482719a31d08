"""`python -m iumad` (also what torchrun launches)."""

from iumad.cli import app

app()
