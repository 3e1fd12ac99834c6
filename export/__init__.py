"""ONNX export of a trained VAE: encoder and decoder graphs, their verification, a manifest.

    vae-dist export [RUN]        # or: python -m export   (latest run of each model kind)
    vae-dist verify RUN
    python -m export.sample sample --model-dir runs/RUN/onnx   # needs only onnxruntime, numpy, Pillow

The pieces, in the order an export uses them:
    export.spec     what is exported: graph wrappers, tensor names, dynamic axes, tolerances, metadata
    export.convert  the export itself (torch.onnx.export), run discovery, the atomic hand-over
    export.verify   checks of a written export against the torch model, and the manifest
    export.variants the edge variants (fp16, int8 dynamic, int8 static, ORT format): what each one is
    export.produce  how each variant is made (onnxruntime's converters and quantisers)
    export.quality  how a variant is judged: checks against its own tolerance, quality cost
    export.edge     the variants of one export folder: made, judged, recorded in the manifest
    export.sample   the torch-free consumer (onnxruntime, numpy and Pillow only)
    export.bench_infer  latency and throughput of every variant against PyTorch eager

This file imports nothing on purpose: `python -m export.sample` imports it first, and the
sampler must run where torch is not installed.
"""
