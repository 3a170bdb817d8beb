"""`python -m preprocess ...`: see preprocess/cli.py."""

from preprocess.cli import main

if __name__ == "__main__":
    main()
