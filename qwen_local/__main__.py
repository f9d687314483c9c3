"""`python -m qwen_local ...` is the `qwen-local` command."""
import sys

from qwen_local.cli import main

sys.exit(main())
