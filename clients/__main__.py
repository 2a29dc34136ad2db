"""`python -m clients`: classify images against a running Triton server.

  python -m clients classify --url 127.0.0.1:8001 --protocol grpc [--top-k 5] [--json] PATH...

PATHs are image files or folders (searched recursively). Prints a row (or a
JSON line with --json) per image as its answer arrives, in completion order;
exits 1 when any image failed, listing the failures at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from builder.core import contract as C

PROGRESS_FROM = 50  # images; below this a progress bar is noise


def _header(text: str):
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:VALUE")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify image files and folders")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 for grpc, :8000 for http)")
    c.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    c.add_argument("--model", default=C.DEFAULT_MODEL, help="ensemble name")
    c.add_argument("--model-version", default="", help="pin a model version")
    c.add_argument("--mode", choices=("ensemble", "classifier"), default="ensemble",
                   help="classifier: preprocess here and call the bare classifier")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    c.add_argument("--max-batch", type=int, default=8, help="images per request")
    c.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    c.add_argument("--retries", type=int, default=3, help="retries while the server is unavailable")
    c.add_argument("--overload-retries", type=int, default=6,
                   help="resubmissions, after a growing backoff, of requests the server rejected as overloaded")
    c.add_argument("--wait", type=float, default=0.0, help="first wait up to this many seconds for readiness")
    c.add_argument("--shared-memory", choices=("none", "system", "cuda"), default="none")
    c.add_argument("--ssl", action="store_true")
    c.add_argument("--root-certificates", default=None)
    c.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header, e.g. 'authorization: Bearer TOKEN'")
    return parser


class _NoProgress:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count: int) -> None:
        pass


def _row(result, top_k: int) -> str:
    if not result.ok:
        return f"{result.source}\tERROR\t{result.error}"
    best = "\t".join(f"{p.label} ({p.score:.3f})" for p in result.predictions[:top_k])
    return f"{result.source}\t{best}"


NOT_SENT = "not classified: "


def _classify(args) -> int:
    from clients.api import Classifier, ClientSettings, collect_images
    from clients.errors import ClientError
    from builder.core.contract import LOCAL_GRPC_URL, LOCAL_HTTP_URL

    url = args.url or (LOCAL_GRPC_URL if args.protocol == "grpc" else LOCAL_HTTP_URL)
    if args.top_k < 1:
        print(f"error: --top-k is {args.top_k}; use 1 or more", file=sys.stderr)
        return 1
    files = collect_images(args.paths)
    if not files:
        print("error: no image files found under " + ", ".join(args.paths), file=sys.stderr)
        return 1
    failed, not_sent, settings = [], [], None
    try:
        settings = ClientSettings(
            url=url, protocol=args.protocol, model=args.model, model_version=args.model_version, mode=args.mode,
            timeout_s=args.timeout, retries=args.retries, overload_retries=args.overload_retries,
            max_batch=args.max_batch, concurrency=args.concurrency,
            ssl=args.ssl, root_certificates=args.root_certificates, headers=tuple(args.header),
            shared_memory=args.shared_memory)
        try:
            from tqdm import tqdm
        except ImportError:  # the client install has no progress bars
            tqdm = _NoProgress
        with Classifier(settings) as client, tqdm(total=len(files), unit="img", file=sys.stderr,
                                                  disable=len(files) < PROGRESS_FROM) as bar:
            if args.wait:
                client.wait_until_ready(args.wait)
            client.check_model()  # a --max-batch the model cannot take fails here, not per request
            # Each answer is printed as it arrives: a server lost at image 72 keeps the 71 before it.
            fewer = False
            for _, result in client.iter_classify([str(f) for f in files], top_k=args.top_k):
                bar.update(1)
                if result.ok and len(result.predictions) < args.top_k and not fewer:  # said once, not per image
                    fewer = True
                    print(f"note: --top-k {args.top_k} is above the model's {len(result.predictions)} classes; "
                          f"the server returns {len(result.predictions)} per image", file=sys.stderr)
                if not result.ok and result.error.startswith(NOT_SENT):
                    not_sent.append(result)  # one cause for all of them: said once on stderr, below
                elif not result.ok:
                    failed.append(result)
                if args.json:  # every image once, for programs that read the lines (and resend the failed)
                    print(json.dumps({"source": result.source, "error": result.error,
                                      "predictions": [{"index": p.index, "label": p.label, "score": round(p.score, 6)}
                                                      for p in result.predictions]}), flush=True)
                elif not result.ok and result.error.startswith(NOT_SENT):
                    continue
                else:
                    print(_row(result, args.top_k), flush=True)
    except ClientError as exc:
        print(f"error: {exc}{_hint(exc, settings)}", file=sys.stderr)
        return 1
    return _summary(files, failed, not_sent)


def _hint(exc, settings) -> str:
    """A wrong port or protocol is the usual cause of an unreachable server: say so."""
    from clients.errors import ServerUnavailable

    if settings is None or not isinstance(exc, ServerUnavailable):
        return ""
    other = "http" if settings.protocol == "grpc" else "grpc"
    return (f" (is {settings.url} the server's {settings.protocol} port? By default tritonserver serves gRPC on "
            f"8001 and HTTP on 8000; pass --url HOST:PORT, or --protocol {other})")


def _summary(files, failed, not_sent) -> int:
    """One line per cause on stderr; exit 1 when any image failed."""
    if not_sent:
        cause = not_sent[0].error[len(NOT_SENT):]
        print(f"error: {cause} ({len(not_sent)} of {len(files)} images not classified)", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(files)} images failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.source}: {r.error}", file=sys.stderr)
    return 1 if failed or not_sent else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI."""
    args = build_parser().parse_args(argv)
    try:
        return _classify(args)
    except KeyboardInterrupt:
        # A Ctrl-C inside tritonclient's constructor leaves a half-built client whose __del__ fails when collected.
        sys.unraisablehook = lambda unraisable: None
        return 130


if __name__ == "__main__":
    sys.exit(main())
