"""A small typed API over tritonclient for the Swin ensemble (and the bare classifier).

    from clients import Classifier, ClientSettings

    with Classifier(ClientSettings(url="127.0.0.1:8001", model="swin_tiny_patch4_window7_224")) as c:
        for result in c.classify(["cat.jpg", open("dog.png", "rb").read()], top_k=3):
            print(result.source, result.top1.label if result.ok else result.error)

Images may be encoded bytes, file paths, HWC uint8 numpy arrays or PIL images.
They are sent `max_batch` per request with up to `concurrency` requests in
flight. A request whose image the server rejects is re-sent image by image, so
one bad upload fails alone and names itself. Retries (with exponential
backoff) happen only where they are safe: the server is unreachable or not
ready yet. Tensor and model names come from `builder.core.contract`.
"""


from clients.aio import AsyncClassifier
from clients.settings import (Classification, ClientSettings, ImageLike, Prediction, collect_images,
                              load_image)
from clients.sync import Classifier

__all__ = ["AsyncClassifier", "Classification", "Classifier", "ClientSettings", "ImageLike", "Prediction",
           "collect_images", "load_image"]
