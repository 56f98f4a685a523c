"""``python -m diffusion.bench``."""

from diffusion.cli.bench import main

main()
