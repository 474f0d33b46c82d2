"""`python -m gpt2lab ...` (and `torchrun -m gpt2lab train ...`)."""

from gpt2lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
