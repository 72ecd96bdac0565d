import sys

from training.study.cli import main

if __name__ == "__main__":  # guarded: --jobs workers re-import this module
    sys.exit(main())
