"""The original project's entry point: `python train.py ...` is `python launcher/run.py ...`."""
import sys

from launcher.run import main

if __name__ == "__main__":
    sys.exit(main())
