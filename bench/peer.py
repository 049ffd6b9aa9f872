"""The peer server of the `peer` section: LitServe serving an imgtrain model, as a LitServe user would write it.

    PYTHONPATH=LITSERVE_FOLDER:$PYTHONPATH python bench/peer.py MODEL --port 8123 \
        --max-batch-size 16 --batch-timeout 0.01 --workers-per-device 1

LITSERVE_FOLDER: where bench/peer_bench.py installs LitServe, pinned, with ``pip install --target``
(``~/.cache/imgtrain-bench/litserve-0.2.19``); torch, numpy, Pillow, FastAPI and uvicorn come from the
Python environment that runs this file, the one imgtrain runs in. Endpoints: ``POST /predict`` (one image)
and ``GET /health`` (200 once the workers are ready).

A request is one image, sent as LitServe receives files: LitServe 0.2.19 hands ``decode_request`` the
request body parsed as a form (``multipart/form-data``, the file in field ``content``, as its file-upload
examples do) or as JSON; it has no way to receive a raw body. A JSON object ``{"image": BASE64}`` is taken
too (its ``ImageInput`` schema's way). The answer is imgtrain serve's: ``{"label", "probability",
"probabilities"}``.

The model runs as in ``imgtrain serve``, so that the comparison is of the servers, not of the arithmetic:
``imgtrain.load_trained_model``; JPEG decoding and resizing by imgtrain's own Pillow steps (data/picture.py:
the draft-scaled decode, EXIF, RGB, the whole picture squashed to the model's size, antialiased bilinear);
normalised by the model's mean and std on the uint8 batch; channels-last; bf16 autocast where the CPU has
it natively, else fp32 (imgtrain's ``--precision auto``); denormals flushed, malloc's large blocks reused,
one warm-up image before the server says it is ready; torch's threads: the cores imgtrain would use, shared
among the inference workers (``--workers-per-device``), each one's torch in its main thread alone.
"""

from __future__ import annotations

import argparse
import base64

import litserve as ls


class ImgtrainAPI(ls.LitAPI):
    """An imgtrain trained model directory behind LitServe."""

    def __init__(self, model: str, workers: int, threads: int | None = None, **options) -> None:
        super().__init__(**options)
        self.model_path, self.workers, self.threads = model, workers, threads

    def setup(self, device) -> None:
        # imgtrain first, before torch: importing it sets OpenMP's spin-wait, as imgtrain serve runs with
        import imgtrain  # noqa: F401, I001
        import torch

        from imgtrain import load_trained_model
        from imgtrain.allocator import reuse_large_blocks
        from imgtrain.data.decode import decode_rgb
        from imgtrain.data.transforms import Normalize
        from imgtrain.precision import autocast, resolve_precision
        from imgtrain.threads import available_cores, torch_default_threads

        torch.set_flush_denormal(True)  # before this thread's OpenMP workers exist: they inherit it
        cores = min(available_cores(), torch_default_threads())
        torch.set_num_threads(self.threads or max(1, cores // self.workers))
        loaded = load_trained_model(self.model_path)
        cpu = torch.device("cpu")
        self.precision = resolve_precision("auto", cpu)
        reuse_large_blocks()
        network = loaded.network.to(cpu, memory_format=torch.channels_last).eval()
        normalize = Normalize(loaded.spec.input.mean, loaded.spec.input.std)
        self.labels = list(loaded.labels)
        preparation = loaded.preparation
        if not preparation.plain:
            raise SystemExit("this peer takes models without a transformation (imgtrain's plain preparation)")

        def pixels(blob: bytes):  # uint8 S x S x 3, as imgtrain serve's decoding threads make it
            return preparation.pixels(decode_rgb(blob, "the request", draft_size=preparation.draft_size))

        def forward(x):  # uint8 N x S x S x 3 (numpy) -> float32 probabilities N x C (numpy)
            batch = torch.from_numpy(x).permute(0, 3, 1, 2)  # a channels-last view of N x 3 x S x S
            with torch.inference_mode(), autocast(self.precision, cpu):
                return network(normalize(batch)).float().softmax(dim=1).numpy()

        self._pixels, self._forward = pixels, forward
        size = loaded.image_size
        import numpy as np

        forward(np.zeros((1, size, size, 3), dtype=np.uint8))  # the first call sets up the kernels
        print(f"peer worker ready: {loaded.spec.architecture}, {size} px, precision {self.precision}, "
              f"{torch.get_num_threads()} torch thread(s)", flush=True)

    def decode_request(self, request):
        upload = request.get("content") if hasattr(request, "get") else None
        if upload is not None and hasattr(upload, "file"):  # a form's file (starlette's UploadFile)
            blob = upload.file.read()
            upload.file.close()
        elif isinstance(request, dict) and isinstance(request.get("image"), str):
            blob = base64.b64decode(request["image"])
        else:
            from fastapi import HTTPException

            raise HTTPException(400, "send the image as a form's file in field 'content', or JSON {\"image\": "
                                     "base64}")
        return self._pixels(blob)

    def batch(self, inputs):
        import numpy as np

        return np.stack(inputs)

    def predict(self, x):
        if x.ndim == 3:  # max_batch_size 1: LitServe passes the one decoded image
            return self._forward(x[None])[0]
        return self._forward(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, row):
        best = int(row.argmax())
        return {"label": self.labels[best], "probability": float(row[best]),
                "probabilities": dict(zip(self.labels, map(float, row), strict=True))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an imgtrain trained model directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=1, help="LitAPI's (LitServe's default: 1)")
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="LitAPI's, in seconds (default: 0)")
    parser.add_argument("--workers-per-device", type=int, default=1,
                        help="LitServer's inference worker processes (default: 1)")
    parser.add_argument("--threads", type=int, help="torch threads in each worker (default: the cores imgtrain "
                                                    "serve uses, divided among the workers)")
    parser.add_argument("--api-servers", type=int,
                        help="server.run's num_api_servers: HTTP server processes (LitServe's default: one per "
                             "inference worker)")
    parser.add_argument("--fast-queue", action="store_true",
                        help="LitServer's fast_queue (ZeroMQ between the HTTP servers and the workers). In 0.2.19 it "
                             "changes nothing: LitServer passes TransportConfig(transport_config=...), a field the "
                             "model does not have, so the transport stays multiprocessing's Manager queues")
    args = parser.parse_args(argv)
    api = ImgtrainAPI(args.model, args.workers_per_device, args.threads, max_batch_size=args.max_batch_size,
                      batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers_per_device,
                          fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
