import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned process (vLLM's, for one) imports the main module again
    sys.exit(main())
