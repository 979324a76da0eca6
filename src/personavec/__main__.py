"""`python -m personavec`: the same command line as the `personavec` script."""

from personavec.cli import main

if __name__ == "__main__":
    main()
