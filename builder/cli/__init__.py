"""The `python -m builder` command line: the options the command lines share (`args.py`, also read by
`builder.engines.trt` in a TensorRT-only Python) and the parser (`parser.py`); the commands are `builder.__main__`."""
