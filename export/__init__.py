"""ONNX export of a trained VAE: encoder and decoder graphs, their verification, a manifest.

    vae-dist export [RUN]        # or: python -m export   (latest run of each model kind)
    vae-dist verify RUN
    vae-dist web [RUN] [--serve]  # the export in the browser: export/site/ and docs/web.md
    python -m export.sample sample --model-dir runs/RUN/onnx   # needs only onnxruntime, numpy, Pillow

The modules, in the order an export uses them:
    export.spec         what is exported: graph wrappers, tensor names, dynamic axes, tolerances, metadata keys
    export.convert      the export of one sub-model (torch.onnx.export) into one self-contained file
    export.verify       checks of written files against the torch model, and a variant's quality cost
    export.variants     the edge variants (fp16, int8 dynamic, int8 static, ORT format): what each is, how it is made
    export.manifest     manifest.json: the only writer of its keys
    export.pipeline     finding runs; export -> verify -> variants -> manifest, and `verify` of an export
    export.cli          the `export` and `verify` commands
    export.sample       the torch-free consumer (onnxruntime, numpy and Pillow only)
    export.bench_infer  latency and throughput of every variant against PyTorch eager
    export.web          `vae-dist web`: a static site running an export in the browser (onnxruntime-web)
    export.bench_web    decode latency in headless Chromium against native onnxruntime

Dependencies point one way: export uses vae_dist, never the reverse. See docs/export.md.

This file imports nothing on purpose: `python -m export.sample` imports it first, and the
sampler must run where torch is not installed.
"""
