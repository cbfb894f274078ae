"""What is built on a run (a new consumer goes here): the CI gate and its history, search, bundles, text generation
from the CLI."""
