"""``python -m diffusion.bench``."""

from diffusion.bench.app import main

main()
