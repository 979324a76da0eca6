"""`python -m personavec.cli` (and `accelerate launch -m personavec.cli`): the `personavec` command line."""

from personavec.cli import main

if __name__ == "__main__":
    main()
