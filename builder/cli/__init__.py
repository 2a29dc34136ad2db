"""The `python -m builder` command line: its parser (`parser.py`); the commands themselves are `builder.__main__`."""
