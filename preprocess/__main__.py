"""`python -m preprocess ...`: see preprocess/cli.py. Without the [preprocess] extra (Ray), one line naming the
pip install that adds it."""

from model.extras import call

if __name__ == "__main__":
    call("preprocess.cli:main")
